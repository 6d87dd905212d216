"""``workerd --config FILE``: every command-line option as a key of a TOML file.

Generic over the click command's options, so an option added to ``workerd`` is a key at once:
the key is the option's long name without its dashes (``max-memory``, ``default-io``), with
``-`` or ``_`` alike. The file fills click's ``default_map``, which gives the precedence
flags > environment (``WORKERD_*``) > file > defaults; ``--print-config`` shows, for every
option, its value and which of the four it came from (:func:`describe`).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import click
from click.core import ParameterSource

NOT_IN_FILE: Final = frozenset({"config", "print_config", "help"})
"""Parameters that make no sense as keys of the file (by parameter name)."""

_META: Final = "jobworker.config_file"
"""Where the callback keeps the ``--config`` path (the option is not passed to the command)."""

SOURCES: Final = {
    ParameterSource.COMMANDLINE: "flag",
    ParameterSource.ENVIRONMENT: "env",
    ParameterSource.DEFAULT_MAP: "file",
    ParameterSource.DEFAULT: "default",
}


def _norm(key: str) -> str:
    return key.replace("_", "-")


def _long_name(option: click.Option) -> str:
    longs = [o for o in option.opts if o.startswith("--")]
    return (longs[0] if longs else option.opts[0]).lstrip("-")


def options(command: click.Command) -> Iterator[click.Option]:
    """The command's options that may be keys of the file, in the command's order."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in NOT_IN_FILE:
            yield param


def keys(command: click.Command) -> dict[str, click.Option]:
    """Normalized key (``-`` for ``_``) -> option, for every long name of every option."""
    out: dict[str, click.Option] = {}
    for option in options(command):
        for opt in option.opts:
            if opt.startswith("--"):
                out[_norm(opt[2:])] = option
    return out


def load(ctx: click.Context, path: Path) -> dict[str, Any]:
    """The ``default_map`` (parameter name -> raw value) of the TOML file ``path`` for
    ``ctx``'s command. Raises :class:`click.BadParameter` naming the file and the key for an
    unreadable file, a key no option has, a key given twice, or a value of the wrong shape or
    type."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}") from e
    known = keys(ctx.command)
    default_map: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        option = known.get(_norm(key))
        if option is None or option.name is None:
            hint = (
                "it is a command-line option only"
                if _norm(key) in {_norm(n) for n in NOT_IN_FILE} | {"print-config"}
                else "see workerd --help for the options; a key is an option's long name "
                "without its dashes"
            )
            raise click.BadParameter(f"{path}: unknown key {key!r} ({hint})")
        if option.name in seen:
            raise click.BadParameter(
                f"{path}: keys {seen[option.name]!r} and {key!r} are the same option; keep one"
            )
        seen[option.name] = key
        default_map[option.name] = _value(ctx, path, key, option, value)
    return default_map


def _value(ctx: click.Context, path: Path, key: str, option: click.Option, value: Any) -> Any:
    """``value`` as click takes it for ``option``, checked now so an error names the file."""
    if isinstance(value, dict):
        raise click.BadParameter(f"{path}: {key} is a table; it must be a value")
    if option.multiple:
        value = value if isinstance(value, list) else [value]
    elif isinstance(value, list):
        raise click.BadParameter(f"{path}: {key} takes one value, not a list")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (dict, list)):
            raise click.BadParameter(f"{path}: {key}: {item!r} must be a single value")
        if isinstance(item, bool) and not (
            option.is_flag or isinstance(option.type, click.types.BoolParamType)
        ):
            raise click.BadParameter(
                f"{path}: {key} = {json.dumps(item)}: this option takes a value, not true/false"
            )
    try:
        option.type_cast_value(ctx, value)
    except click.BadParameter as e:
        raise click.BadParameter(f"{path}: {key}: {e.message}") from e
    return value


def callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """The eager ``--config`` callback: fill ``ctx.default_map`` from the file before click
    looks the other options up."""
    ctx.meta[_META] = value
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **load(ctx, value)}
    return value


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return json.dumps(str(value))


def describe(ctx: click.Context) -> list[str]:
    """``--print-config``: one line per option, ``KEY = VALUE  # SOURCE`` (TOML, so the lines
    can go into a config file), or ``# KEY unset  # SOURCE`` for an option without a value;
    SOURCE is ``flag``, ``env``, ``file`` or ``default``."""
    lines = []
    for option in [*options(ctx.command), *_config_option(ctx.command)]:
        name = option.name
        assert name is not None
        value = ctx.meta.get(_META) if name == "config" else ctx.params.get(name)
        source = ctx.get_parameter_source(name)
        where = SOURCES.get(source, source.name.lower()) if source else "default"
        key = _long_name(option)
        if value is None:
            lines.append(f"# {key} unset  # {where}")
        else:
            lines.append(f"{key} = {_render(value)}  # {where}")
    return lines


def _config_option(command: click.Command) -> Iterator[click.Option]:
    for param in command.params:
        if isinstance(param, click.Option) and param.name == "config":
            yield param
