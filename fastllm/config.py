"""Frozen-dataclass configs: dotted overrides parsed by field type, JSON round trips, recipes.

A config is a tree of frozen dataclasses. ``apply_overrides(config, ["train.steps=10"])`` walks the
dotted key down the tree, parses the text by the field's annotated type (``int``, ``float``,
``bool``, ``str``, ``Optional``, ``Literal``, tuples, nested dataclasses) and rebuilds every
dataclass on the way with :func:`dataclasses.replace`, so each one's ``__post_init__`` validates
again. Any failure is a :class:`ConfigError` whose message starts with the full dotted key.

A *recipe* is a plain Python file defining ``config()`` that returns the top-level config;
:func:`load_recipe` imports it from its path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import sys
import traceback
import types
import typing
from pathlib import Path
import collections.abc
from collections.abc import Iterable
from typing import Any, Literal, Union

from fastllm.errors import UserError

__all__ = [
    "ConfigError",
    "require",
    "apply_overrides",
    "override",
    "validate",
    "parse_value",
    "to_dict",
    "from_dict",
    "load_recipe",
    "schema",
    "partial_fields",
    "merge_partial",
]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


_SEQUENCES = (tuple, list, collections.abc.Sequence)


class ConfigError(UserError):
    """A bad config key or value; the message names the dotted key."""


def require(condition: bool, key: str, message: str) -> None:
    """Validation helper for ``__post_init__``: ``ValueError("key: message")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(instance_or_cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(instance_or_cls) if f.init}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``Optional[X]``; other types unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) < len(args):
            return (inner[0] if len(inner) == 1 else Union[tuple(inner)]), True
    return tp, False


def _split_items(text: str) -> list[str]:
    """``"1,2"``, ``"(1, 2)"`` or ``"[1,2]"`` -> ``["1", "2"]`` (no nesting)."""
    body = text.strip()
    if body[:1] in "([" and body[-1:] in ")]":
        body = body[1:-1]
    return [item.strip() for item in body.split(",") if item.strip()]


def _require_finite(number: float, text: Any) -> None:
    """No config float may be inf or nan: a comparison such as ``eps > 0`` lets inf through and
    every comparison is false for nan, so neither would be caught field by field."""
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {text!r}")


def _parse_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text.replace("_", ""), 0)
        except ValueError:
            try:
                number = float(text)  # "1e3" is a fine way to write 1000
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {text!r}") from None
            return int(number)
    if tp is float:
        try:
            number = float(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        _require_finite(number, text)
        return number
    if tp is str:
        return text
    if tp is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise ValueError(f"cannot parse a value of type {tp!r} from text")


def parse_value(text: str, tp: Any, _in_container: bool = False) -> Any:
    """Parse override text as annotated type ``tp`` (raises ``ValueError`` saying what was expected)."""
    inner, nullable = _strip_optional(tp)
    if nullable and text.strip().lower() in _NONE_WORDS:
        return None
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if text == str(choice) or (isinstance(choice, bool) and text.lower() == str(choice).lower()):
                return choice
        raise ValueError(f"must be one of {list(choices)}, got {text!r}")
    if origin in _SEQUENCES:
        args = typing.get_args(inner) or (Any, Ellipsis)
        if origin is not tuple:
            args = (args[0], Ellipsis)  # Sequence[X] / list[X]: any length, kept as a tuple
        if text.strip().startswith("[{"):  # a JSON list of objects: dataclass items
            return _from_json(json.loads(text), tuple[args], "value")
        items = _split_items(text)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(item, args[0], True) for item in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(item, arg, True) for item, arg in zip(items, args))
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(inner):
            try:
                return parse_value(text, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin in (dict, typing.Mapping) or inner is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {text!r}")
        return value
    if dataclasses.is_dataclass(inner) and _in_container:
        return text  # a bare string standing for a dataclass item; its owner's __post_init__ coerces it
    if dataclasses.is_dataclass(inner):
        raise ValueError("is a section, not a value: set one of its fields, e.g. "
                         f"<key>.{next(iter(_fields(inner)))}=...")
    return _parse_scalar(text, inner)


def _mapping_value(text: str) -> Any:
    """An entry of a mapping field (``mesh.rules.seq=tensor``): JSON if it parses, ``none``/``null``
    as None, else the text itself."""
    if text.strip().lower() in _NONE_WORDS:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _with_field(config: Any, name: str, value: Any, check: bool) -> Any:
    if check:
        return dataclasses.replace(config, **{name: value})
    unchecked = copy.copy(config)  # validated later, once every override is in (see apply_overrides)
    object.__setattr__(unchecked, name, value)
    return unchecked


def override(config: Any, key: str, text: str, *, check: bool = True, _prefix: str = "") -> Any:
    """``config`` with the dotted ``key`` set from ``text``; errors name the full key.

    ``check=False`` parses the value but skips the dataclasses' validation (used between several
    overrides, which may only be consistent together).
    """
    head, _, rest = key.partition(".")
    full = f"{_prefix}{head}"
    fields = _fields(config)
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}; {_prefix[:-1] + ' has' if _prefix else 'top-level'} keys: "
                          f"{', '.join(sorted(fields))}")
    tp = _hints(type(config))[head]
    if rest:
        current = getattr(config, head)
        inner, _ = _strip_optional(tp)
        if current is None and dataclasses.is_dataclass(inner):
            current = inner()  # an unset optional section comes alive when a field of it is set
        if isinstance(current, dict) and "." not in rest:
            value = {**current, rest: _mapping_value(text)}  # an existing entry keeps its place (order matters)
        elif not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {full + '.' + rest!r}: {full!r} is a value, not a section")
        else:
            value = override(current, rest, text, check=check, _prefix=f"{full}.")
    else:
        try:
            value = parse_value(text, tp)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"bad value for {full}={text!r}: {error}") from None
    try:
        return _with_field(config, head, value, check)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid {_prefix}{key}={text!r}: {error}") from None


def validate(config: Any) -> Any:
    """Rebuild every dataclass of the tree bottom-up, running each ``__post_init__`` again."""
    changes = {name: validate(getattr(config, name)) for name in _fields(config)
               if dataclasses.is_dataclass(getattr(config, name))}
    return dataclasses.replace(config, **changes)


def _split_assignment(item: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    return key.strip(), text.strip()


def apply_overrides(config: Any, overrides: Iterable[str] | dict[str, Any]) -> Any:
    """Apply ``["a.b=1", ...]`` (or ``{"a.b": "1"}``) in order."""
    pairs = list(overrides.items() if isinstance(overrides, dict) else map(_split_assignment, overrides))
    pairs = [(key, text if isinstance(text, str) else json.dumps(text)) for key, text in pairs]
    if len(pairs) == 1:
        return override(config, *pairs[0])
    for key, text in pairs:
        config = override(config, key, text, check=False)
    try:
        return validate(config)
    except (ValueError, TypeError) as error:
        applied = " ".join(f"{key}={text}" for key, text in pairs)
        raise ConfigError(f"invalid config after overrides [{applied}]: {error}") from None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _jsonable(getattr(value, name)) for name in _fields(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of the config's init fields."""
    return _jsonable(config)


def _from_json(value: Any, tp: Any, key: str) -> Any:
    inner, nullable = _strip_optional(tp)
    if value is None:
        if not nullable:
            raise ConfigError(f"{key}: null is not allowed here")
        return None
    if dataclasses.is_dataclass(inner):
        return from_dict(inner, value, _prefix=f"{key}.")
    if inner is float and isinstance(value, float):
        try:
            _require_finite(value, value)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
    if typing.get_origin(inner) in _SEQUENCES and isinstance(value, list):
        args = typing.get_args(inner) or (Any, Ellipsis)
        item_types = list(args) if typing.get_origin(inner) is tuple and args[1:] != (Ellipsis,) else [args[0]] * len(value)
        return tuple(_from_json(v, t, key) for v, t in zip(value, item_types))
    return value


def from_dict(cls: type, data: dict[str, Any], *, _prefix: str = "") -> Any:
    """Inverse of :func:`to_dict`; unknown keys are an error naming them, missing ones take defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields, hints = _fields(cls), _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {_prefix + unknown[0]!r}")
    values = {name: _from_json(value, hints[name], _prefix + name) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{_prefix}{error}") from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> tuple[types.ModuleType, Any]:
    """Import the recipe file at ``path``, call its ``config()`` and apply ``overrides``.

    Returns ``(module, config)``; the module may define hooks the trainer calls (see docs/config.md).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    name = f"fastllm_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in the recipe need their module registered
    with _recipe_errors(path):
        # compiled here rather than by spec.loader.exec_module, which would write a __pycache__
        # beside the recipe: fastllm writes nowhere but run.dir
        exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102 - the user's recipe
        if not callable(getattr(module, "config", None)):
            raise ConfigError(f"recipe {str(path)!r} must define a function config() returning the config")
        config = module.config()
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"recipe {str(path)!r}: config() returned a {type(config).__name__}, expected a config "
                          "dataclass (e.g. fastllm.train.Config)")
    return module, apply_overrides(config, overrides)


@contextlib.contextmanager
def _recipe_errors(path: Path):
    """A recipe that does not parse, imports what is not there, builds an invalid config or raises
    in its own code is bad input: one message naming the recipe and its line. An exception raised
    deeper, in fastllm, of another type, is a bug and propagates with its traceback."""
    try:
        yield
    except ConfigError:
        raise
    except SyntaxError as error:
        raise ConfigError(f"recipe {str(path)!r}, line {error.lineno}: {error.msg}") from None
    except Exception as error:  # noqa: BLE001 - sorted below into the recipe's fault and fastllm's
        frames = traceback.extract_tb(error.__traceback__)
        lines = [frame.lineno for frame in frames if _same_file(frame.filename, path)]
        own = bool(frames) and _same_file(frames[-1].filename, path)
        if not (own or isinstance(error, (ValueError, TypeError, ImportError))):
            raise
        where = f", line {lines[-1]}" if lines else ""
        raise ConfigError(f"recipe {str(path)!r}{where}: {type(error).__name__}: {error}") from None


def _same_file(name: str, path: Path) -> bool:
    return Path(name).resolve() == path.resolve()


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def schema(cls: type, _prefix: str = "") -> list[tuple[str, str, Any]]:
    """``[(dotted key, type, default), ...]`` of every leaf field, sections expanded (for docs)."""
    rows = []
    hints = _hints(cls)
    for name, field in _fields(cls).items():
        tp = hints[name]
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            rows += schema(inner, f"{_prefix}{name}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append((_prefix + name, _type_name(tp), default))
    return rows


def partial_fields(cls: type) -> list[tuple[str, Any, dataclasses.Field]]:
    """Fields for a dataclass whose every field is ``Optional[original] = None``: "keep" unless set.

    Nested dataclass fields become partials too, so ``model.rope.theta=1e6`` changes one field of
    a preset's rope config and keeps the rest. Use with :func:`dataclasses.make_dataclass`.
    """
    out = []
    for name, tp in _hints(cls).items():
        if name not in _fields(cls):
            continue
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            part = dataclasses.make_dataclass(f"Partial{inner.__name__}", partial_fields(inner), frozen=True)
            out.append((name, typing.Optional[part], dataclasses.field(default=None)))
        else:
            out.append((name, typing.Optional[tp], dataclasses.field(default=None)))
    return out


def merge_partial(base: Any, partial: Any, names: Iterable[str] | None = None) -> Any:
    """``base`` with every non-``None`` field of ``partial`` (restricted to ``names``) applied."""
    changes = {}
    for name in names if names is not None else _fields(base):
        value = getattr(partial, name)
        if value is None:
            continue
        current = getattr(base, name)
        if dataclasses.is_dataclass(value):
            inner, _ = _strip_optional(_hints(type(base))[name])
            value = merge_partial(current if current is not None else inner(), value)
        changes[name] = value
    return dataclasses.replace(base, **changes) if changes else base
