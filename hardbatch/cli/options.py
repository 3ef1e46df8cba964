"""Click options generated from a config dataclass, so field docs are the CLI help."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
_TYPES = {"int": int, "float": float, "str": str}


def options_from(cls: type, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Adds one option per field of dataclass `cls` (bools become --x/--no-x flags and
    dict fields repeatable `--x key=value`)."""

    def decorate(fn: F) -> F:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind == "bool":
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default,
                                  show_default=True, help=help_)(fn)
            elif kind.startswith("dict"):
                fn = click.option(flag.removesuffix("s"), f.name, multiple=True,
                                  metavar="KEY=VALUE", help=help_)(fn)
            else:
                fn = click.option(flag, f.name, type=_TYPES[kind], default=f.default,
                                  show_default=f.default != "", help=help_)(fn)
        return fn

    return decorate


def build(cls: type, values: dict[str, Any]) -> Any:
    """Makes `cls` from parsed options, turning repeated KEY=VALUE options into dicts and
    config errors into usage errors."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if isinstance(v, tuple):
            pairs = [item.partition("=") for item in v]
            if any(not sep for _, sep, _ in pairs):
                raise click.BadParameter(f"expected KEY=VALUE, got {v}", param_hint=f.name)
            v = {k: val for k, _, val in pairs}
        kwargs[f.name] = v
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
