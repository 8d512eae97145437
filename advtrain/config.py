"""Configuration files for the ``advtrain`` command line.

A config file holds the same options as a subcommand's flags, one key per
flag: the flag's name without the leading dashes, written with ``_`` or ``-``
(``batch_size`` and ``batch-size`` both mean ``--batch-size``). TOML (read
with :mod:`tomllib`, Python 3.11+, or the ``tomli`` package) and JSON are
accepted, chosen by the file's suffix (``.toml`` / ``.json``; anything else is
tried as TOML, then JSON)::

    # apart.toml
    method = "apart"
    model = "preactresnet18"
    data = "./data"
    epochs = 30
    eps = "8/255"        # a number or a fraction string, pixel units
    out = "runs/apart"

Values are checked against the flag they stand for (its type, its choices,
``true``/``false`` for switches; a list of names or a comma list string
for a comma-list flag such as ``sites``) and converted as the flag would convert
them, so a config file can never hold something the command line would
reject. Unknown keys are an error naming them. Nothing in a config file is
evaluated as code.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from .cli_methods import parse_names

PathLike = Union[str, "Path"]

#: Parser destinations that are never options a config file may set.
RESERVED = frozenset({"help", "config", "command", "func"})


class ConfigError(ValueError):
    """A config file cannot be read or holds an unknown or invalid option."""


def _load_toml(text: str, path: Path) -> Dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or the tomli package "
                              "(pip install tomli); or write the config as JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def load_config(path: PathLike) -> Dict[str, Any]:
    """Read a TOML or JSON config file into a flat dict with ``_`` in its
    keys. Raises :class:`ConfigError` (one line, naming the file) if the file
    is missing, unparsable, not a table of options, or names an option twice
    (``batch-size`` and ``batch_size``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = _load_json(text, path)
    elif suffix == ".toml":
        raw = _load_toml(text, path)
    else:
        try:
            raw = _load_toml(text, path)
        except ConfigError:
            try:
                raw = _load_json(text, path)
            except ConfigError:
                raise ConfigError(f"{path} is neither valid TOML nor valid JSON "
                                  "(name it .toml or .json to see the parser's message)") from None
    return normalize_keys(raw, path)


def normalize_keys(raw: Any, source: Optional[PathLike] = None) -> Dict[str, Any]:
    """A parsed config (a table of options) with ``-`` turned into ``_`` in
    its keys; raises :class:`ConfigError` if it is not a table or names an
    option twice."""
    where = str(source) if source is not None else "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a table of options (key = value), got {type(raw).__name__}")
    config: Dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in config:
            raise ConfigError(f"{where}: option {name!r} is given twice (as {key!r} and in another spelling)")
        config[name] = value
    return config


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """The parser's optional flags by destination (help and --config excluded)."""
    return {a.dest: a for a in parser._actions  # argparse has no public accessor for its actions
            if a.option_strings and a.dest not in RESERVED and a.dest is not argparse.SUPPRESS}


def _is_switch(action: argparse.Action) -> bool:
    """A flag that takes no value (store_true, store_false, --x/--no-x)."""
    return action.nargs == 0


def _convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the flag would hold it, or raise ValueError with the reason."""
    if value is None:
        if action.default is None:
            return None
        raise ValueError("must not be null")
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return float(value)
    if kind is None or kind is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        converted = value
    elif kind is parse_names and isinstance(value, list):  # a comma-list flag: a list of names too
        if not value or not all(isinstance(name, str) for name in value):
            raise ValueError(f"must be a non-empty list of names or a comma list string, got {value!r}")
        converted = parse_names(",".join(value))
    else:  # a parsing function such as parse_eps: feed it the text the flag would get
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"must be a number or a string, got {value!r}")
        try:
            converted = kind(value if isinstance(value, str) else repr(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(str(exc)) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"invalid choice {converted!r} (choose from {', '.join(map(repr, action.choices))})")
    return converted


def option_names(parser: argparse.ArgumentParser) -> Iterable[str]:
    """The keys a config file for ``parser``'s command may hold."""
    return sorted(_options(parser))


def resolve_config(parser: argparse.ArgumentParser, config: Mapping[str, Any],
                   source: Optional[PathLike] = None, ignore: Iterable[str] = ()) -> Dict[str, Any]:
    """Check ``config`` (from :func:`load_config`) against ``parser``'s flags
    and return the values converted as the flags would convert them, keyed by
    destination. Keys in ``ignore`` are dropped. Raises :class:`ConfigError`
    naming every unknown key, or the first invalid value."""
    where = f"config file {source}" if source is not None else "config"
    options = _options(parser)
    skip = set(ignore)
    unknown = [k for k in config if k not in options and k not in skip]
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {listed} "
                          f"(known: {', '.join(sorted(options))})")
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if key in skip:
            continue
        try:
            out[key] = _convert(options[key], value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    return out


__all__ = ["ConfigError", "load_config", "normalize_keys", "option_names", "resolve_config"]
