"""YAML configs mapped onto frozen dataclasses, strictly (unknown keys are errors).

>>> cfg = load_yaml_config(MyConfig, "benchmarks/smoke.yaml")   # doctest: +SKIP

Field types drive the conversion: nested dataclasses are built from mappings,
``tuple[...]`` fields from lists, ``Path`` fields from strings. Everything else
is passed through as YAML gave it. Every error, from the file, the keys or the
dataclass's own checks (``__post_init__`` raising ValueError / TypeError), is one
:class:`~lidc_det.errors.ConfigError` whose message starts with the file and key.
:func:`config_hash` is the short, stable hash recorded next to results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from lidc_det.errors import ConfigError

T = TypeVar("T")

#: The former name of :class:`~lidc_det.errors.ConfigError` (the same class).
ConfigFileError = ConfigError


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if value is None:  # an empty YAML section: all defaults
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_mapping(hint, value, where)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "<config>") -> T:
    """Build the dataclass ``cls`` from ``data``; unknown or missing keys raise ConfigFileError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if str(err).startswith(where):
            raise
        raise ConfigError(f"{where}: {err}") from err
    except (ValueError, TypeError) as err:  # a dataclass's own checks
        raise ConfigError(f"{where}: {err}") from err


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: ``{}``); ConfigError otherwise.

    A top-level ``base: other.yaml`` (relative to this file) reads that file first and lays
    this one over it: mappings merge key by key, at any depth; any other value (a list
    included) replaces the base's. Bases may have bases; a cycle is a ConfigError.
    """
    return _read_with_base(Path(path), ())


def merge_mappings(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: nested mappings merge, other values replace."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_mappings(out[k], v)
        else:
            out[k] = v
    return out


def _read_with_base(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    data = _read_one_mapping(path)
    if "base" not in data:
        return data
    ref = data.pop("base")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: base must be a file name, got {ref!r}")
    base_path = (path.parent / ref).resolve()
    chain = (*seen, path.resolve())
    if base_path in chain:
        raise ConfigError(f"{path}: base {ref!r} makes a cycle ({' -> '.join(p.name for p in (*chain, base_path))})")
    return merge_mappings(_read_with_base(base_path, chain), data)


def _read_one_mapping(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def load_yaml_config(cls: type[T], path: str | Path, key: str | None = None) -> T:
    """Read a YAML file (or its top-level section ``key``) into the dataclass ``cls``
    (see :func:`from_mapping`)."""
    data: Any = read_yaml_mapping(path)
    where = str(path)
    if key is not None:
        if key not in data:
            raise ConfigError(f"{path}: no section {key!r} (sections: {sorted(data)})")
        data, where = data[key] or {}, f"{path}.{key}"
    return from_mapping(cls, data, where)


def to_plain(obj: Any) -> Any:
    """A JSON-friendly copy of a (nested) dataclass config: tuples -> lists, Paths -> str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """12 hex digits of the SHA-256 of the config's canonical JSON."""
    blob = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
