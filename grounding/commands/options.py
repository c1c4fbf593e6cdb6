"""Command-line options generated from ``grounding.config.AttendConfig``, so a new setting is added once.

Every field becomes ``--field-name`` (choices from its ``Literal`` type, help from its metadata) with no
default of its own: what the user does not give comes from a base configuration the command chooses (a
trained run's own ``grounding:`` settings, or the paper's for ``reproduce``), and the help says which.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from grounding.config import AttendConfig

#: Extra spellings kept for the options users already type.
ALIASES: dict[str, tuple[str, ...]] = {"sam_checkpoint": ("--sam",)}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_attend_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults_from: str,
    exclude: tuple[str, ...] = (),
) -> None:
    """One option per ``AttendConfig`` field; ``defaults_from`` says in the help where unset values come from."""
    group = parser.add_argument_group(f"attend-and-segment settings (unset: {defaults_from})")
    hints = typing.get_type_hints(AttendConfig)
    for field in dataclasses.fields(AttendConfig):
        if field.name in exclude:
            continue
        kwargs: dict[str, Any] = {"default": None, "dest": field.name, "help": field.metadata.get("help")}
        hint = hints[field.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:  # --remove-corner / --no-remove-corner; unset stays None (the base decides)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+", metavar="L")
        elif hint in (int, float):
            kwargs["type"] = hint
        group.add_argument(_option(field.name), *ALIASES.get(field.name, ()), **kwargs)


def attend_settings(args: argparse.Namespace, base: AttendConfig) -> AttendConfig:
    """``base`` with every option the user gave; ``--sam`` alone selects the SAM refiner. Bad values stop
    with a one-line error naming the option."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(AttendConfig)
        if getattr(args, f.name, None) is not None
    }
    if "sam_checkpoint" in given and "refiner" not in given:
        given["refiner"] = "sam"
    try:
        return dataclasses.replace(base.attend_settings(), **given)
    except ValueError as err:
        name = str(err).split(" ", 1)[0]
        option = _option(name) if name in {f.name for f in dataclasses.fields(AttendConfig)} else ""
        raise SystemExit(f"error: {option + ': ' if option else ''}{err}") from None


def describe(settings: AttendConfig) -> str:
    """One line listing the settings a command runs with (printed, so a user knows what was used)."""
    return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(settings).items())
