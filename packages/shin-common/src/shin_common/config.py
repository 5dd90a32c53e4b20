"""Typed dataclass configs from YAML/JSON files plus ``key=value`` command-line overrides.

>>> @dataclass
... class TrainConfig:
...     lr: float = 0.1
...     epochs: int = 10
>>> load_config(TrainConfig, overrides=["lr=0.05"])
TrainConfig(lr=0.05, epochs=10)

Nested dataclass fields are addressed with dots (``optimizer.lr=3e-4``). Values are parsed as
YAML scalars (``true``, ``1e-3``, ``[2, 4]``) and then checked against the field's annotation.
Every error names the key, the value and what was expected. The dataclass's own
``__post_init__`` validation runs after all values are set.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without sexagesimal integers, so an N:M pattern like ``2:4`` stays the string "2:4"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``, converting where the conversion is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a mapping for {_describe(tp)}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"{key}={value!r}: expected a list for {_describe(tp)}")
        items = list(value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} items for {_describe(tp)}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(items, args, strict=True)))
        item_type = args[0] if args else Any
        converted = [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(items)]
        container = origin or tp
        return container(converted)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(repr(m.value) for m in tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a pattern like 2:4 stays text; a bare 50 becomes "50"
        raise ConfigError(f"{key}={value!r}: expected a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}={value!r}: expected a path")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    return value


def _build(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; expected one of {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {name: _coerce(prefix + name, data[name], hints[name]) for name in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__ + ': '}{exc}") from exc


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a=1", "opt.lr=3e-4"]`` into a nested dict of YAML-parsed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a nested config")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.json`` file holding one mapping."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else _yaml_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid {file.suffix[1:] or 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from ``defaults``, then the file at ``path``, then ``key=value`` overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data: dict[str, Any] = dict(defaults or {})
    if path is not None:
        data = _merge(data, read_config_file(path))
    data = _merge(data, parse_overrides(overrides))
    return _build(cls, data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (paths and enums as strings), for records and YAML dumps."""
    from shin_common.records import to_jsonable

    return to_jsonable(config)


def apply_overrides(config: C, overrides: Iterable[str]) -> C:
    """A copy of the dataclass instance ``config`` with ``key=value`` overrides applied and checked."""
    return _build(type(config), _merge(config_to_dict(config), parse_overrides(overrides)))
