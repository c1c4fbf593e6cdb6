"""The layering rules of README's layout section, read from every module's imports (function-level included).

- ``encoders`` imports no other project package;
- ``datamodules`` imports nothing of the project but ``encoders``' public interface (transform, config);
- ``grounding``'s library never imports ``lmm``: only the application layer (``grounding.commands``, the
  command table ``grounding/__main__.py``) may;
- the config schema (``*.config`` modules) imports only the standard library and other schema modules;
- there is no import cycle anywhere.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("encoders", "datamodules", "grounding", "lmm")
SCHEMA = {"encoders.config", "datamodules.config", "grounding.config", "lmm.config"}
ENCODERS_PUBLIC = {"encoders.transform", "encoders.config"}


def module_imports(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports anywhere in its body (a package import counts as
    its ``__init__``), plus third-party top-level names under the key ``<module>:external``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    if (root / "train.py").is_file():
        modules["train"] = root / "train.py"
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        project, external = set(), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top not in PACKAGES and top != "train":
                    if top != "__future__":
                        external.add(top)
                    continue
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    project.add(target)
        graph[name] = project
        graph[f"{name}:external"] = external
    return graph


def violations(root: Path) -> list[str]:
    graph = module_imports(root)
    found = []
    for name, deps in graph.items():
        if name.endswith(":external"):
            continue
        package = name.split(".")[0]
        for dep in sorted(deps):
            dep_package = dep.split(".")[0]
            if package == "encoders" and dep_package != "encoders":
                found.append(f"{name} imports {dep}: encoders imports no other project package")
            if (
                package == "datamodules"
                and dep_package not in ("datamodules",)
                and dep not in ENCODERS_PUBLIC
            ):
                found.append(f"{name} imports {dep}: datamodules may only use {sorted(ENCODERS_PUBLIC)}")
            application = name.startswith("grounding.commands") or name == "grounding.__main__"
            if package == "grounding" and not application and dep_package == "lmm":
                found.append(f"{name} imports {dep}: grounding's library never imports lmm")
            if name in SCHEMA and dep not in SCHEMA:
                found.append(f"{name} imports {dep}: the schema imports only the standard library and itself")
        if name in SCHEMA:
            for top in sorted(graph[f"{name}:external"] - set(sys.stdlib_module_names)):
                found.append(f"{name} imports {top}: the schema imports only the standard library")
    found += [
        f"import cycle: {' -> '.join(cycle)}"
        for cycle in cycles({k: v for k, v in graph.items() if ":" not in k})
    ]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_project_keeps_its_layers():
    assert violations(ROOT) == []


def test_the_check_catches_each_kind_of_forbidden_import(tmp_path):
    # A copy of the layout with one forbidden import of each kind: each must be reported.
    files = {
        "encoders/__init__.py": "",
        "encoders/base.py": "import torch\n",
        "encoders/config.py": "import dataclasses\n",
        "encoders/transform.py": "from encoders.config import ASPECT_MODES\n",
        "datamodules/__init__.py": "",
        "datamodules/config.py": "from omegaconf import OmegaConf\n",
        "datamodules/shards.py": "def f():\n    from encoders.base import VisualEncoder\n",
        "grounding/__init__.py": "",
        "grounding/config.py": "",
        "grounding/attend.py": "def g():\n    import lmm.model\n",
        "grounding/commands/__init__.py": "",
        "grounding/commands/demo.py": "from lmm.model import LMM\n",
        "lmm/__init__.py": "",
        "lmm/config.py": "from lmm.model import LMM\n",
        "lmm/model.py": "from lmm.run import x\nfrom encoders.base import VisualEncoder\n",
        "lmm/run.py": "from lmm.model import LMM\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(violations(tmp_path))
    assert "encoders.base imports torch" not in found, "third-party imports are fine outside the schema"
    assert "datamodules.config imports omegaconf" in found
    assert "datamodules.shards imports encoders.base" in found
    assert "grounding.attend imports lmm.model" in found
    assert "grounding.commands.demo" not in found, "the application layer may import lmm"
    assert "lmm.config imports lmm.model" in found
    assert "import cycle: lmm.model -> lmm.run -> lmm.model" in found


def test_registries_and_schema_choices_agree():
    import typing

    from datamodules.templates import TEMPLATES
    from encoders.config import ENCODER_CONFIGS
    from encoders.registry import BUILTIN_ENCODERS, encoder_class
    from grounding.config import REFINERS as REFINER_CHOICES
    from grounding.segment import REFINERS
    from lmm.config import ProjectorName, TemplateName
    from lmm.projector import PROJECTORS

    assert set(typing.get_args(TemplateName)) == set(TEMPLATES)
    assert set(typing.get_args(ProjectorName)) == set(PROJECTORS)
    assert set(REFINER_CHOICES) == set(REFINERS)
    assert set(BUILTIN_ENCODERS) == set(ENCODER_CONFIGS)
    for name, config in ENCODER_CONFIGS.items():
        assert encoder_class(name).Config is config
