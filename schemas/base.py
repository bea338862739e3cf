"""Typed, validated records that round-trip through YAML and JSON.

Every config and store record is a dataclass deriving from `Record`. Loading validates
each field against its annotation and names the offending field on error:

    >>> DumpConfig.from_dict({"batch_size": "eight"})
    ConfigError: DumpConfig.batch_size: expected int, got str 'eight'

A config field documents itself for the CLI with `option` (schemas/cli.py turns every field
into a flag named after it, `lr` -> `--lr`):

    lr: float = option(1e-3, help="student learning rate", group="optimisation", aliases=("--learning-rate",))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "Record",
    "apply_overrides",
    "build",
    "canonical",
    "field_types",
    "option",
    "read_config",
    "type_name",
]

R = TypeVar("R", bound="Record")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-3` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


class _Dumper(yaml.SafeDumper):
    """Quotes every string the loader would read back as a float (e.g. "0E0")."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


# Resolving annotations is the slow part of building a record; cache it per class.
field_types = functools.cache(get_type_hints)


class ConfigError(ValueError):
    """A config or record failed validation; the message names the field and the fix."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str | None = None,
    aliases: tuple[str, ...] | Mapping[str, str | tuple[str, ...]] = (),
    instead_of: str | None = None,
    factory: Callable[[], Any] | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field with what the CLI shows for it (schemas/cli.py reads the metadata).

    help: the flag's help text (the default is appended by the CLI). group: the `--help`
    section of a subcommand's own fields. aliases: more flag names, for a plain field a tuple
    (`("--learning-rate",)`), for a nested record its fields' (`{"name_or_path": "--teacher"}`);
    group and aliases count only on the fields of the subcommand's own record. instead_of:
    this field, when set, replaces that one (`warmup_ratio` instead of `warmup_steps`): a
    config layer that sets the other one drops a lower layer's value of this one (see build).
    factory: a default_factory. positional: on the command line a bare argument, in field order
    (`kvdistill store verify STORE`), not a flag; only a subcommand's own plain fields."""
    metadata = {"help": help, "group": group, "aliases": aliases, "instead_of": instead_of, "positional": positional}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, dict):
        return f"{get_origin(tp).__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; build nested records; raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(get_args(tp)):
            return None
        if len(arms) == 1:  # Optional[X]: report X's own, more precise, error
            return _coerce(value, arms[0], where)
        for arm in arms:
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return tp.from_dict(value, _where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class Record:
    """Base for every schema record: validated construction, dict / YAML / JSON round trip."""

    def __post_init__(self) -> None:
        # Validate the fields of records built in Python too, not only those loaded from files.
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise ConfigError naming the field."""

    def check_min(self, minimum: float, *names: str, strict: bool = False) -> None:
        """ConfigError naming the first field of `names` below `minimum` (or equal to it, when
        strict) and the allowed range; None (an optional field left unset) passes, NaN fails."""
        for name in names:
            value = getattr(self, name)
            if value is not None and not (value > minimum if strict else value >= minimum):
                raise ConfigError(
                    f"{type(self).__name__}.{name}: must be {'>' if strict else '>='} {minimum}, got {value}"
                )

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any], _where: str | None = None) -> R:
        where = _where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = canonical(cls, data, where)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}{_did_you_mean(cls, unknown)}"
            )
        hints = field_types(cls)
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in kwargs]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls: type[R], text: str) -> R:
        return cls.from_dict(load_yaml(text) or {})

    def save(self, path: str | Path) -> Path:
        """Write as YAML or JSON, chosen by the file extension."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())
        return path

    @classmethod
    def load(cls: type[R], path: str | Path, overrides: dict[str, Any] | None = None) -> R:
        """Read a YAML / JSON file, apply dotted-key overrides (CLI flags), validate."""
        return build(cls, path, overrides or {})


# --- config-file spellings: a field by any of its flag names ------------------------------------


def _record_of(tp: Any) -> type[Record] | None:
    """The record class of a `Record` or `Record | None` annotation, else None."""
    arms = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    if len(arms) == 1 and isinstance(arms[0], type) and issubclass(arms[0], Record):
        return arms[0]
    return None


@functools.cache
def _spellings(cls: type[Record]) -> dict[str, tuple[str, ...]]:
    """{key in a config file: the field it sets} for the names that are not the field's own: each
    flag alias that `option(aliases=...)` declares, without its dashes and with '_' for '-'
    (`--learning-rate` -> learning_rate: ("lr",); a nested record's `--teacher-name` ->
    teacher_name: ("teacher", "name")). A field's name always means that field."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        aliases = f.metadata.get("aliases") or ()
        if isinstance(aliases, Mapping):
            pairs = [
                (a, (f.name, leaf))
                for leaf, spelled in aliases.items()
                for a in ((spelled,) if isinstance(spelled, str) else spelled)
            ]
        else:
            pairs = [(a, (f.name,)) for a in ((aliases,) if isinstance(aliases, str) else aliases)]
        for alias, target in pairs:
            key = alias.lstrip("-").replace("-", "_")
            if key not in names:
                out[key] = target
    return out


def canonical(cls: type[Record], data: Any, where: str, deep: bool = False) -> Any:
    """`data` (a mapping of `cls` fields, as read from a file) with every key spelled as the flag
    spells it (`learning-rate`, `learning_rate` for --learning-rate; `max-steps`) renamed to
    its field (`lr`, `max_steps`), so files accept what the command line accepts and a saved
    record has one name per field. A field set twice under two names is refused. deep: nested
    records' mappings too. Keys that name nothing are left for from_dict to report."""
    if not isinstance(data, dict):
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    spellings = _spellings(cls)
    out: dict[Any, Any] = {}
    nested: list[tuple[str, tuple[str, ...], Any]] = []
    given: dict[tuple[str, ...], str] = {}
    for key, value in data.items():
        norm = key.replace("-", "_") if isinstance(key, str) else key
        target = (norm,) if norm in names else spellings.get(norm)
        if target is None:
            out[key] = value
            continue
        if target in given:
            raise ConfigError(f"{where}: {given[target]!r} and {key!r} both set {'.'.join(target)}; keep one")
        given[target] = key
        if len(target) == 1:
            out[target[0]] = value
        else:
            nested.append((key, target, value))
    for key, (name, leaf), value in nested:
        inner = out.get(name, {})
        if not isinstance(inner, dict):
            raise ConfigError(
                f"{where}: {key!r} sets {name}.{leaf}, but {name} is {inner!r}, not a mapping; set it inside {name}"
            )
        if leaf in inner or leaf.replace("_", "-") in inner:
            raise ConfigError(f"{where}: {key!r} and {name}.{leaf} both set {name}.{leaf}; keep one")
        out[name] = {**inner, leaf: value}
    if deep:
        hints = field_types(cls)
        for name in names & set(out):
            sub = _record_of(hints[name])
            if sub is not None:
                out[name] = canonical(sub, out[name], f"{where}.{name}", deep=True)
            elif (
                get_origin(hints[name]) is list
                and get_args(hints[name])
                and _record_of(get_args(hints[name])[0])
                and isinstance(out[name], list)
            ):
                item = _record_of(get_args(hints[name])[0])
                out[name] = [canonical(item, v, f"{where}.{name}[{i}]", deep=True) for i, v in enumerate(out[name])]
    return out


def _did_you_mean(cls: type[Record], unknown: list[Any]) -> str:
    """ "; did you mean lr for 'learnig_rate'?": the fields whose name or flag an unknown key is close to."""
    import difflib

    names = {f.name: f.name for f in dataclasses.fields(cls)} | {k: ".".join(v) for k, v in _spellings(cls).items()}
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key).replace("-", "_"), list(names), n=1, cutoff=0.75)
        if close:
            field = names[close[0]]
            hints.append(f"{field} for {key!r}")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with dotted keys (`teacher.name_or_path`) set; None means unset."""
    out = json.loads(json.dumps(data))
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {p} is not a mapping")
        node[leaf] = _plain(value)
    return out


def read_config(path: str | Path, cls: type[Record]) -> dict[str, Any]:
    """The mapping in a YAML / JSON config file of `cls`, unvalidated (an empty file is {}), each
    key spelled as its field (`canonical`: a flag alias such as learning_rate is lr)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path}: cannot parse: {e}") from e
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of {cls.__name__} fields")
    try:
        return canonical(cls, data, cls.__name__, deep=True)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _over(cls: type[Record], below: dict[str, Any], above: set[str]) -> dict[str, Any]:
    """`below` without the fields that a field set in a layer above replaces: a lower layer's
    warmup_ratio goes when a higher one sets warmup_steps (option(instead_of=...))."""
    replaced = {
        f.name for f in dataclasses.fields(cls) if f.metadata.get("instead_of") in above and f.name not in above
    }
    return {k: v for k, v in below.items() if k not in replaced}


def build(cls: type[R], config: str | Path | None, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> R:
    """What every CLI does, in layers, each over the one below: `base` (a recipe) < `--config
    file.yaml` < flags (dotted keys; None: not given). A layer replaces a lower layer's value
    of each field it sets, whole (a nested mapping too)."""
    data = canonical(cls, dict(base or {}), cls.__name__, deep=True)
    if config is not None:
        above = read_config(config, cls)
        data = {**_over(cls, data, set(above)), **above}
    data = _over(cls, data, {k.split(".")[0] for k, v in overrides.items() if v is not None})
    try:
        return cls.from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        if config is None:
            raise
        raise ConfigError(f"{config}: {e}") from e
