"""Run configs: nested dataclasses built from a YAML file plus ``key=value`` overrides, range-checked once.

    load_config(cls, path=None, overrides=()) -> cls     YAML + ["a.b=3", ...] into the dataclass ``cls``
    config_to_dict(cfg) -> dict                          nested plain dict (YAML/checkpoint friendly)
    parse_overrides(["a.b=3"]) -> {"a": {"b": 3}}
    ranged(default, ge=/gt=/le=/lt=, why=)              a dataclass field with its allowed range
    RangeChecked                                         base class: ranges checked in __post_init__ too
    check_ranges(cfg)                                    what :func:`load_config` runs on every dataclass it builds

Types are coerced from the annotations. Every numeric field is checked where its dataclass is built: a float
must be finite (no ``.nan``/``.inf``), and a field declared with :func:`ranged` must lie in its range (tuples:
every element). A bad value is one line ``key=value: what is allowed``, e.g. ``optim.lr=-1.0: must be > 0``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import yaml

from backend.errors import DiffTumorError


# ------------------------------------------------------------------------------------------ ranges
@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``ge``/``gt`` below, ``le``/``lt`` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str | None = None  # the message's "what is allowed" (default: built from the bounds)

    def __contains__(self, v) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        if self.why:
            return self.why
        if self.ge == 1 and self.gt is self.le is self.lt is None:
            return "must be a positive integer"
        if self.ge == 0 and self.gt is self.le is self.lt is None:
            return "must be 0 or more"
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"must be in {low}, {high}"
        if low:
            return f"must be {'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"must be {'<=' if self.le is not None else '<'} {high[:-1]}"


def ranged(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, ge=None, gt=None, le=None, lt=None,
           why: str | None = None):
    """A dataclass field whose value (every element, for a tuple or list) must lie in the given range."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt, why=why)})


POSITIVE = {"ge": 1}  # counts: ranged(10, **POSITIVE)
NON_NEGATIVE = {"ge": 0}
# a crop side in voxels: 1 .. 512 (the release trains on 96; a 512^3 float32 batch is already 0.5 GB a crop)
CROP_VOXELS = {"ge": 1, "le": 512,
               "why": "each value must be a positive integer, at most 512 (voxels a side; the release uses 96)"}
PROBABILITY = {"ge": 0.0, "le": 1.0, "why": "must be a probability in [0, 1]"}


class ConfigRangeError(ValueError):
    """A value outside its field's range; :func:`load_config` turns it into one line with the dotted key."""

    def __init__(self, key: str, value, why: str):
        self.key, self.value, self.why = key, value, why
        super().__init__(f"{key}={value}: {why}")


def _numbers(value):
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_ranges(cfg) -> None:
    """Raise :class:`ConfigRangeError` for the first numeric field of ``cfg`` (not its nested dataclasses, which
    are checked when they are built) that is not finite or lies outside its :func:`ranged` range."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        numbers = _numbers(value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigRangeError(f.name, _show(value), "must be a finite number")
        rng = f.metadata.get("range")
        if rng is not None and any(v not in rng for v in numbers):
            each = "each value " if isinstance(value, (list, tuple)) and not rng.why else ""
            raise ConfigRangeError(f.name, _show(value), f"{each}{rng.describe()}")


class RangeChecked:
    """Base of a config dataclass whose :func:`ranged` fields are checked however it is built (from YAML by
    :func:`load_config`, or in code: ``OptimConfig(lr=-1)`` raises :class:`ConfigRangeError`)."""

    def __post_init__(self):
        check_ranges(self)


def _show(value):
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------ config
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Convert a YAML value to the annotated type ``tp`` (raises ValueError with a short reason)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"expected {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        scalar = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        if scalar and origin is tuple and args and args[-1] is Ellipsis:  # "crop=64" for a tuple[int, ...]
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else typing.Any
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _build(cls, data: dict, where: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise DiffTumorError(
                f"{where}: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})"
            )
        tp = hints[key]
        if is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = _build(tp, value, where, prefix=f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp, where)
        except (ValueError, TypeError) as exc:
            raise DiffTumorError(f"{where}: key '{prefix}{key}': {exc}") from None
    try:
        cfg = cls(**kwargs)
        check_ranges(cfg)
    except ConfigRangeError as exc:
        raise DiffTumorError(f"{prefix}{exc.key}={exc.value}: {exc.why}") from None
    except (ValueError, TypeError) as exc:
        raise DiffTumorError(f"{where}: {' '.join(str(exc).split())}") from None
    return cfg


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides) -> dict:
    """``["a.b=3", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise DiffTumorError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise DiffTumorError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DiffTumorError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return out


def load_config(cls, path=None, overrides=()):
    """Build dataclass ``cls`` from an optional YAML file and ``key=value`` overrides (dotted keys for
    nested dataclasses). Types are coerced from the annotations; unknown keys and bad values raise
    one-line DiffTumorErrors naming the file (or "override")."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise DiffTumorError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise DiffTumorError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
        except OSError as exc:
            raise DiffTumorError(f"{path}: cannot read the config ({exc.strerror or type(exc).__name__})") from None
        except yaml.YAMLError as exc:
            raise DiffTumorError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(loaded, dict):
            raise DiffTumorError(f"{path}: expected a mapping of settings at the top level")
        data = loaded
    ov = parse_overrides(overrides)
    if ov:
        where = f"{where} + overrides" if path is not None else "override"
    return _build(cls, _merge(data, ov), where)


def config_to_dict(cfg) -> dict:
    """Nested plain dict (tuples -> lists, Paths -> str) of a config dataclass."""

    def plain(v):
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)
