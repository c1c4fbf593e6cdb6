"""Encoder classes by registry name: the name a config's ``encoder.name`` gives -> the class that builds it.

Built-in encoders are imported only when asked for, so looking up ``clip`` never imports diffusers. Another
encoder joins with ``@register_encoder("name")`` on a ``VisualEncoder`` subclass whose ``Config`` is its
schema dataclass; that adds the schema to ``encoders.config.ENCODER_CONFIGS`` too, so configs naming it
load and validate like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from encoders.base import VisualEncoder
from encoders.config import ENCODER_CONFIGS

#: Built-in encoders: registry name -> (module, class).
BUILTIN_ENCODERS: dict[str, tuple[str, str]] = {
    "clip": ("encoders.clip", "ClipEncoder"),
    "diffusion": ("encoders.diffusion", "DiffusionEncoder"),
    "fused": ("encoders.fused", "FusedEncoder"),
}

_REGISTERED: dict[str, type[VisualEncoder]] = {}


def register_encoder(name: str) -> Callable[[type[VisualEncoder]], type[VisualEncoder]]:
    """Class decorator adding an encoder (and its ``Config`` schema) to the registries under ``name``."""

    def add(cls: type[VisualEncoder]) -> type[VisualEncoder]:
        if name in BUILTIN_ENCODERS or (name in _REGISTERED and _REGISTERED[name] is not cls):
            raise ValueError(f"encoder name {name!r} is already registered")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"{cls.__name__}.Config must be the encoder's config dataclass")
        _REGISTERED[name] = cls
        ENCODER_CONFIGS[name] = cls.Config
        return cls

    return add


def encoder_names() -> list[str]:
    return sorted({*BUILTIN_ENCODERS, *_REGISTERED})


def encoder_class(name: str) -> type[VisualEncoder]:
    """Look an encoder class up by registry name, with a one-line error listing the known names."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN_ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {encoder_names()}")
    module, attribute = BUILTIN_ENCODERS[name]
    return getattr(importlib.import_module(module), attribute)


def build_encoder(config: Any) -> VisualEncoder:
    """Build the encoder named by ``config.name`` from its config dataclass."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"encoder config must be a dataclass instance, got {type(config).__name__}")
    return encoder_class(config.name)(config)
