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

A ``str`` field set by an override keeps the text exactly as written: ``name=0x10`` gives
``"0x10"``, ``tag=010`` gives ``"010"``, ``flag=yes`` gives ``"yes"`` (YAML would read these as 16,
8 and True). In a union with ``str`` such as ``str | int``, the other type is chosen only when the
text is that value's plain spelling (``10`` is the int 10, ``010`` and ``1_000`` stay text; for
floats any ordinary decimal such as ``0.5``, ``1.10`` or ``1e-3`` is the number) and a quoted value
(``name='10'``) is always text. In a union with ``None`` the value is None only when written as
YAML's null (``null``, ``Null``, ``NULL``, ``~``): ``tag=#3``, all comment to YAML, is the text
``"#3"``; an empty value (``tag=``) is the empty string. An explicit YAML tag decides the type
(``name=!!str 10`` is ``"10"``). Values in YAML/JSON config files follow the file format's own
typing (quote a value there to make it a string).
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

    def compose_scalar_node(self, anchor: str | None) -> yaml.ScalarNode:
        # Record whether the scalar had an explicit tag (``!!str 10``): its node does not say.
        event = self.peek_event()
        node = super().compose_scalar_node(anchor)
        node.explicitly_tagged = event.tag not in (None, "!")
        return node


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


# YAML 1.1 reads 1e-3 (no dot) as a string; read it as the float everyone means (YAML 1.2 does).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class _Written:
    """An override's YAML scalar together with the text it was written as.

    ``value`` is what YAML made of it, ``text`` the scalar's own characters (without quotes) and
    ``quoted`` whether it was quoted. A ``str`` field takes ``text``, so nothing is lost to YAML's
    reading of ``0x10``, ``010`` or ``yes``; every other type takes ``value`` as before. A scalar
    with an explicit tag (``!!str 10``, ``!!float 1``) is ``tagged``: it is taken as its tag made it.
    """

    text: str
    value: Any
    quoted: bool
    tagged: bool = False

    def __repr__(self) -> str:  # error messages show the value as YAML read it ...
        if self.value is None and self.text.strip() not in _YAML_NULLS:
            return repr(self.text)  # ... or the text where YAML read only a comment (``#3``)
        return repr(self.value)


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_Written` replaced by what YAML read."""
    if isinstance(value, _Written):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _from_node(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_object(node, deep=True)
        tagged = getattr(node, "explicitly_tagged", False)
        return _Written(node.value, value, quoted=node.style is not None, tagged=tagged)
    if isinstance(node, yaml.SequenceNode):
        return [_from_node(loader, child) for child in node.value]
    if isinstance(node, yaml.MappingNode):
        if any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value):
            return loader.construct_object(node, deep=True)  # ``<<`` merge keys: no source text kept
        return {loader.construct_object(key, deep=True): _from_node(loader, child) for key, child in node.value}
    return loader.construct_object(node, deep=True)


def _yaml_load_keeping_text(text: str) -> Any:
    """Parse like :func:`_yaml_load`, but with every scalar as a :class:`_Written`."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _from_node(loader, node)
    finally:
        loader.dispose()


_YAML_NULLS = frozenset({"null", "Null", "NULL", "~", ""})  # YAML 1.1's spellings of null
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _spelled_as(text: str, tp: Any) -> tuple[bool, Any]:
    """Whether ``text`` is the plain spelling of a ``tp`` value (and that value), for ``str`` unions."""
    if tp is bool:
        lowered = text.lower()
        return (lowered in ("true", "false"), lowered == "true")
    if tp is int:
        return (True, int(text)) if _PLAIN_INT.fullmatch(text) else (False, None)
    if tp is float:
        return (True, float(text)) if _PLAIN_FLOAT.fullmatch(text) else (False, None)
    return (False, None)


def _coerce_written(key: str, written: _Written, tp: Any) -> Any:
    """:func:`_coerce` for an override scalar: ``str`` fields get the text exactly as written."""
    if tp is Any:
        return written.value
    if written.tagged:
        return _coerce(key, written.value, tp)
    if tp is str:
        return written.text
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if written.text.strip() in _YAML_NULLS and not written.quoted and type(None) in args:
            return None  # ``null`` or ``~``; not a value YAML dropped as a comment (``tag=#3``)
        options = [option for option in args if option is not type(None)]
        if str in options:
            if written.quoted:
                return written.text
            for option in options:
                if option is str:
                    continue
                if option in (bool, int, float):
                    matches, converted = _spelled_as(written.text, option)
                    if matches:
                        return converted
                    continue
                try:
                    return _coerce_written(key, written, option)
                except ConfigError:
                    continue
            return written.text
        for option in options:
            try:
                return _coerce_written(key, written, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={written!r}: expected {_describe(tp)}")
    try:
        return _coerce(key, written.value, tp)
    except ConfigError as error:
        if written.text == written.value:
            raise
        reading_error = error
    try:  # e.g. a Path, Literal or enum value that YAML would read as a number: 010, 1_000
        return _coerce(key, written.text, tp)
    except ConfigError:
        raise reading_error from None


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``, converting where the conversion is lossless."""
    if isinstance(value, _Written):
        return _coerce_written(key, value, tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [option for option in args if option is not type(None)]
        if not isinstance(value, str):
            # A number or boolean is kept as it is where the union allows, and otherwise turned
            # into text only as a last resort: ``str | int`` keeps 0 as 0, not "0".
            exact = [option for option in options if option is type(value)]
            options = exact + [o for o in options if o is not str and o not in exact] + [o for o in options if o is str]
        for option in options:
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
        # A string is refused even when it spells a number: a quoted "0.5" in a file is text.
        raise ConfigError(f"{key}={value!r}: expected a number, not {type(value).__name__}")
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
    return _plain(value)


def _build(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    computed = sorted(f.name for f in dataclasses.fields(cls) if not f.init and f.name in data)
    if computed:
        raise ConfigError(
            f"config key{'s' if len(computed) > 1 else ''} {', '.join(prefix + k for k in computed)} "
            f"cannot be set: {cls.__name__} computes {'them' if len(computed) > 1 else 'it'} (init=False)"
        )
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


def _parse_overrides_keeping_text(overrides: Iterable[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _yaml_load_keeping_text(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if value is None or (isinstance(value, _Written) and not value.quoted and not value.tagged):
            # A lone unquoted scalar: a str field gets the whole text, including what YAML would
            # drop as a comment (``tag=run #3``, ``tag=#3``).
            value = _Written(raw.strip(), getattr(value, "value", None), quoted=False)
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
    named: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from ``defaults``, then the file at ``path``, then ``named`` values, then overrides.

    ``named`` maps dotted keys to values already typed by a command-line flag (``{"optim.lr": 3e-4}``);
    a key given both there and in ``overrides`` is refused rather than silently resolved.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data: dict[str, Any] = dict(defaults or {})
    if path is not None:
        data = _merge(data, read_config_file(path))
    overridden = _parse_overrides_keeping_text(overrides)
    for key, value in (named or {}).items():
        if _has_key(overridden, key):
            raise ConfigError(f"{key} is set twice, by its own flag and by --set {key}=...; give it once")
        data = _merge(data, _nest(key, value))
    data = _merge(data, overridden)
    return _build(cls, data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (paths and enums as strings), for records and YAML dumps."""
    from shin_common.records import to_jsonable

    return to_jsonable(config)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _has_key(nested: Mapping[str, Any], dotted: str) -> bool:
    node: Any = nested
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def config_keys(cls: type) -> list[tuple[str, str, Any]]:
    """Every settable key of the config dataclass ``cls``: (dotted key, type, default), nested flattened."""
    hints = typing.get_type_hints(cls)
    keys: list[tuple[str, str, Any]] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        if field.default is not dataclasses.MISSING:
            default: Any = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            keys += [(f"{field.name}.{key}", kind, value) for key, kind, value in config_keys(tp)]
        else:
            keys.append((field.name, _describe(tp), default))
    return keys


def add_config_options(parser: Any, cls: type) -> None:
    """Give an ``argparse`` (sub)parser the toolkit's config grammar: ``--config FILE --set KEY=VALUE``.

    ``--help`` then lists every key of ``cls`` with its type and default. Read the result with
    :func:`config_from_args`; a command adds its own named flags for the commonest keys.
    """
    import argparse

    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML or JSON file of config keys")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key (repeatable; dotted keys reach nested configs); see the keys below",
    )
    lines = [f"  {key} ({kind}) = {json.dumps(_jsonable_default(default))}" for key, kind, default in config_keys(cls)]
    parser.epilog = f"config keys ({cls.__name__}), for --config and --set:\n" + "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _jsonable_default(value: Any) -> Any:
    from shin_common.records import to_jsonable

    return to_jsonable(value)


def config_from_args(cls: type[C], args: Any, named: Mapping[str, Any] | None = None) -> C:
    """The config of a command: defaults < ``--config`` < named flags given (not None) < ``--set``.

    ``named`` maps dotted config keys to the values of the command's own flags, e.g.
    ``{"optim.lr": args.lr}``; a flag left at None was not given and does not count.
    """
    given = {key: value for key, value in (named or {}).items() if value is not None}
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or (), named=given)
