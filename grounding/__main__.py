"""The grounding commands, in one table: ``python -m grounding <command> [options]``.

Each command is a module of ``grounding.commands`` with a ``main(argv)``; only the chosen one is imported.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("grounding.commands.demo", "ground one image: result.json and an overlay"),
    "infer": ("grounding.commands.infer", "ground a folder of images into GLaMM-format predictions"),
    "evaluate": ("grounding.commands.evaluate", "GCG / PNG / RES metrics of prediction files"),
    "reproduce": ("grounding.commands.reproduce", "the paper's evaluations from released weights"),
    "layer-sweep": ("grounding.commands.layer_sweep", "a run's grounding metrics per decoder layer"),
}


def usage() -> str:
    lines = ["usage: python -m grounding <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m grounding <command> --help for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
