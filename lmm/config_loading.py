"""Reading run configs: YAML files + group selections + dotted overrides -> a validated ``TrainConfig``.

``load_config(files, overrides)`` reads YAML files with OmegaConf (a file may name base files under
``extends:``), applies group selections (``encoder=fused_tiny`` merges ``configs/encoder/fused_tiny.yaml``)
and dotted overrides (``stages.pretrain.max_steps=10``), resolves interpolations, and builds the schema's
dataclasses (``lmm.config``). Every key and value is checked before any work starts: an unknown key, a
value of the wrong type, a choice outside its ``Literal`` or a value the schema's own checks refuse stops
with one line naming the key, the value and what was expected. The ``encoder:`` section is checked against
the schema of the encoder its ``name`` selects (``encoders.config.ENCODER_CONFIGS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from encoders.config import encoder_config_class
from lmm.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


#: Sections whose ``name`` picks a class from a registry (and with it the section's schema).
REGISTRY_SECTIONS = ("encoder",)


class ConfigError(ValueError):
    """A configuration that does not fit the schema; the message is one line naming the key."""


# ------------------------------------------------------------------------------------------ loading
def load_config(files: list[str] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML files (default: configs/default.yaml) + ``group=name`` selections + ``dotted.key=value``."""
    paths = [Path(f) for f in files] if files else [DEFAULT_CONFIG]
    merged = OmegaConf.create()
    for path in paths:
        merged = _merge(merged, _load_yaml(path, seen=()))
    dotted = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        group = CONFIG_DIR / key
        if "." not in key and group.is_dir():
            fragment = group / f"{value}.yaml"
            if not fragment.is_file():
                choices = sorted(p.stem for p in group.glob("*.yaml"))
                raise ConfigError(f"{key}={value}: no {fragment}; expected one of {choices}")
            merged = _merge(merged, _load_yaml(fragment, seen=()))
        else:
            dotted.append(item)
    if dotted:
        merged = _merge(merged, OmegaConf.from_dotlist(dotted))
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception as err:  # interpolation errors carry multi-line context
        raise ConfigError(str(err).splitlines()[0]) from None
    return config_from_dict(data)


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> Any:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    bases = node.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = _merge(merged, _load_yaml(path.parent / base, seen + (path,)))
    return _merge(merged, node)


def _merge(base: Any, update: Any) -> Any:
    """OmegaConf merge, except that a section choosing a different registry entry replaces the old one.

    Switching ``encoder.name`` from clip to diffusion must not carry CLIP-only keys into the diffusion
    section, where they would be unknown keys.
    """
    for section in REGISTRY_SECTIONS:
        new_name = OmegaConf.select(update, f"{section}.name", default=None)
        old_name = OmegaConf.select(base, f"{section}.name", default=None)
        if new_name is not None and new_name != old_name and section in base:
            base = OmegaConf.masked_copy(base, [k for k in base if k != section])
    return OmegaConf.merge(base, update)


def config_from_dict(data: dict) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError("the configuration is not a mapping")
    return _build(TrainConfig, data, "")


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config_to_dict(config)), path)


def read_config_file(path: Path) -> TrainConfig:
    """A resolved config as ``save_config`` wrote it (a run's ``config.yaml``), validated like any config."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ConfigError(f"{path}: not a readable config ({str(err).splitlines()[0]})") from None
    return config_from_dict(data)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = _nearest(str(key), list(fields))
            hint = f" (did you mean '{prefix}{near}'?)" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for key, value in data.items():
        if cls is TrainConfig and key == "encoder":
            kwargs[key] = _build_encoder_section(value, prefix + key)
        else:
            kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        # The schema's checks start their message with the field's name: make it the full dotted key.
        first = message.split(" ", 1)[0]
        if prefix and first in fields:
            raise ConfigError(f"{prefix}{message}") from None
        raise ConfigError(f"{prefix.rstrip('.')}: {message}" if prefix else message) from None


def _build_encoder_section(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping with a 'name', got {_kind(value)}")
    name = value.get("name", "clip")
    try:
        cls = encoder_config_class(name)
    except ValueError as err:
        raise ConfigError(f"{key}.name: {err}") from None
    return _build(cls, {**value, "name": name}, key + ".")


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in args:
            return str(value)  # YAML reads a choice such as precision 32 as a number
        allowed = ", ".join(map(str, args))
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key} = {value!r} is not one of: {allowed}{hint}")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_kind(value)}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_kind(value)}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if value is None:
        raise ConfigError(f"{key} must not be null (expected {getattr(hint, '__name__', hint)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported schema type {hint}")


def _nearest(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: a close spelling, else the longest key it starts with."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixes = [v for v in valid if key.startswith(v) or v.startswith(key)]
    return max(prefixes, key=len) if prefixes else None


def _kind(value: Any) -> str:
    return type(value).__name__
