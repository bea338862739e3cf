"""CLI plumbing shared by every stage: a subcommand's flags come from its config record.

Every field is one flag named after it, in YAML and on the command line alike (`lr` ->
`--lr`; a nested record's fields `--teacher.name-or-path`), with the help text, `--help` group
and extra names that its `option(...)` declares (schemas/base.py), and a value its annotation
parses:

    Literal          one of the choices
    bool             --allow-empty / --no-allow-empty
    list[X]          a comma list, or the flag repeated: --report-to tensorboard,wandb
    dict[str, X]     name=value,name=value (or a YAML mapping: {name: value})
    a record         its fields, a flag each (--teacher.revision main)
    list[record]     items: a YAML mapping of its fields, or the record's one required field

`--config file.yaml` gives the whole record; each flag given overrides the file, a flag left
unset does not. A field declared `option(..., positional=True)` is a bare argument instead
(`kvdistill store verify STORE`); a small tool's record may go without `--config`
(`add_flags(..., config=False)`: its required fields are then required flags). Help texts
show the record's real defaults."""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from .base import Record, build, field_types, load_yaml, type_name

__all__ = ["Flag", "add_flags", "config_from_args", "flags_of"]


@dataclasses.dataclass(frozen=True)
class Flag:
    """One leaf field of a record as a command-line flag."""

    key: str  # dotted field path, also the argparse dest: "teacher.name_or_path"
    names: tuple[str, ...]  # "--teacher.name-or-path", then the aliases ("--teacher")
    tp: Any  # the field's annotation
    help: str
    group: str | None  # --help section; None: the parser's own options
    positional: bool = False  # a bare argument (names: just the key), not a flag


def _record(tp: Any) -> type[Record] | None:
    """The record class of a `Record` or `Record | None` annotation, else None."""
    arms = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    if len(arms) == 1 and isinstance(arms[0], type) and issubclass(arms[0], Record):
        return arms[0]
    return None


def _leaves(cls: type[Record], prefix: str = ""):
    """(dotted key, annotation, field) of every non-record field, nested records walked."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        sub = _record(hints[f.name])
        if sub is not None:
            yield from _leaves(sub, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f


def flags_of(cls: type[Record]) -> list[Flag]:
    """Every leaf field of `cls` as a Flag. Group and aliases count on `cls`'s own fields: a
    nested record's fields go into its field's group (by default one named after the field)."""
    out = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        aliases = f.metadata.get("aliases") or ()
        sub = _record(hints[f.name])
        if sub is None:
            leaves = [(f.name, hints[f.name], f)]
            group = f.metadata.get("group")
            names = {f.name: (aliases,) if isinstance(aliases, str) else tuple(aliases)}
        else:
            leaves = list(_leaves(sub, f"{f.name}."))
            group = f.metadata.get("group") or f.name
            names = {f"{f.name}.{k}": (v,) if isinstance(v, str) else tuple(v) for k, v in dict(aliases).items()}
        positional = bool(f.metadata.get("positional"))
        if positional and (sub is not None or aliases):
            raise TypeError(f"{cls.__name__}.{f.name}: a positional field is a plain one, without aliases")
        for key, tp, leaf in leaves:
            names_ = (key,) if positional else ("--" + key.replace("_", "-"), *names.get(key, ()))
            out.append(Flag(key, names_, tp, leaf.metadata.get("help", ""), group, positional))
    unknown = {
        a
        for f in dataclasses.fields(cls)
        if isinstance(f.metadata.get("aliases"), dict)
        for a in (f"{f.name}.{k}" for k in f.metadata["aliases"])
    } - {fl.key for fl in out}
    if unknown:
        raise TypeError(f"{cls.__name__}: aliases name no field: {sorted(unknown)}")
    return out


# ------------------------------------------------------------------------- values


def _split(text: str) -> list[str]:
    """Split at the commas outside brackets: "a={x: 1, y: 2},b" -> ["a={x: 1, y: 2}", "b"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _value(tp: Any) -> Callable[[str], Any]:
    """text -> a value of annotation `tp` (argparse's `type=`); validation is the record's."""
    arms = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    if len(arms) > 1:  # e.g. cka_layers: "middle" | "last" | list[int]
        parsers = [_value(a) for a in arms]

        def union(text: str) -> Any:
            for parse in parsers:
                try:
                    return parse(text)
                except (argparse.ArgumentTypeError, ValueError):
                    pass
            raise argparse.ArgumentTypeError(f"expected {type_name(tp)}, got {text!r}")

        return union
    (tp,) = arms
    origin = get_origin(tp)
    if tp in (int, float, str):
        return tp
    if tp is bool:
        return _bool
    if tp is Any:
        return load_yaml
    if origin is Literal:
        choices = get_args(tp)

        def choice(text: str) -> Any:
            if text in choices:
                return text
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(map(repr, choices))})")

        return choice
    if origin is list:
        item = _value(get_args(tp)[0])
        return lambda text: [item(x) for x in _split(text)]
    if origin is dict:
        key, val = (_value(a) for a in get_args(tp))

        def mapping(text: str) -> dict[str, Any]:
            if text.lstrip().startswith("{"):
                return load_yaml(text)
            out = {}
            for pair in _split(text):
                name, eq, value = pair.partition("=")
                if not eq or not name.strip():
                    raise argparse.ArgumentTypeError(f"expected name=value,name=value, got {text!r}")
                out[key(name.strip())] = val(value.strip())
            return out

        return mapping
    rec = _record(tp)
    if rec is not None:  # an item of list[record]
        required = [
            f.name
            for f in dataclasses.fields(rec)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return lambda text: (
            load_yaml(text) if text.lstrip().startswith("{") or len(required) != 1 else {required[0]: text}
        )
    raise TypeError(f"no command-line syntax for {type_name(tp)}")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Collect(argparse.Action):
    """A list or mapping flag given again adds to what it gave (`--report-to a --report-to b`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if isinstance(values, dict):
            setattr(namespace, self.dest, {**before, **values} if isinstance(before, dict) else values)
        else:
            setattr(namespace, self.dest, [*before, *values] if isinstance(before, list) else values)


# ------------------------------------------------------------------------- help


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, str) and "\n" in value:
        return repr(value)
    return str(value)


def _default(cls: type[Record], key: str, config: bool = True) -> str:
    """The default of a dotted field of a record class, as help text. A nested default comes
    from the parent's default instance (EvalConfig.data.split is "test", not DataSpec's).
    config: the command has --config, which may give a required field instead."""
    *parents, leaf = key.split(".")
    obj, unset = None, ""
    for p in parents:
        f = next(f for f in dataclasses.fields(cls) if f.name == p)
        if obj is not None:
            obj = getattr(obj, p)
        elif f.default_factory is not dataclasses.MISSING:
            obj = f.default_factory()
        elif f.default is None and not unset:  # an optional record, off unless one of its flags is given
            unset = p
        cls = _record(field_types(cls)[p])
    when = f" when {unset} is set" if unset else ""
    if obj is not None:
        value = getattr(obj, leaf)
    else:
        f = next(f for f in dataclasses.fields(cls) if f.name == leaf)
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return f" (required{when or (' unless in --config' if config else '')})"
    shown = "" if value is None else _show(value)
    return f" (default{when}: {shown})" if shown else ""


# ------------------------------------------------------------------------- parser


def add_flags(
    parser: argparse.ArgumentParser,
    record: type[Record],
    groups: dict[str, str | None] | None = None,
    suppress: bool = False,
    config: bool = True,
    progress: bool = True,
) -> list[Flag]:
    """`--config`, a flag per field of `record` (a positional field: a bare argument),
    `--no-progress`; returns the Flags.

    groups: --help sections in this order, title -> description (None: a record field's
    help); the others follow in field order. suppress: a flag not given sets nothing (for a
    subcommand's subparser, so that it does not reset what its parent parsed, e.g. `train
    --config x diagnose`). config: False for a tool of a few flags (no file; a required field
    is a required flag). progress: False for a command that shows no progress bar."""
    default = argparse.SUPPRESS if suppress else None
    flags = flags_of(record)
    if config:
        if parser.usage is None:
            bare = "".join(f" {f.key.upper()}" for f in flags if f.positional)
            parser.usage = f"%(prog)s [--config FILE] [--FIELD VALUE ...]{bare}"
        parser.add_argument(
            "--config", metavar="FILE", default=default, help="YAML or JSON file with the config; flags override it"
        )
    helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(record)}  # a record field's group: its help
    sections = {
        title: parser.add_argument_group(title, helps.get(title) if about is None else about)
        for title, about in (groups or {}).items()
    }
    for flag in flags:
        if flag.group is None:
            target: Any = parser
        else:
            if flag.group not in sections:
                sections[flag.group] = parser.add_argument_group(flag.group, helps.get(flag.group))
            target = sections[flag.group]
        _add(target, flag, record, default, config)
    if progress:
        parser.add_argument(
            "--no-progress",
            action="store_true",
            default=default if suppress else False,
            help="no progress bars (logs, CI)",
        )
    return flags


def _add(target: Any, flag: Flag, record: type[Record], default: Any, config: bool) -> None:
    shown = _default(record, flag.key, config)
    required = shown.startswith(" (required")
    if flag.positional and required:
        shown = ""  # a bare argument: the usage line shows it is required
    help_ = (flag.help + shown).replace("%", "%%")
    arms = (
        [a for a in get_args(flag.tp) if a is not type(None)]
        if get_origin(flag.tp) in (Union, types.UnionType)
        else [flag.tp]
    )
    tp = arms[0] if len(arms) == 1 else flag.tp
    leaf = flag.key.rsplit(".", 1)[-1].upper()
    if flag.positional:
        if tp not in (str, int, float) and get_origin(tp) is not Literal:
            raise TypeError(f"{record.__name__}.{flag.key}: a positional field is a str, int, float or Literal")
        choices = {"choices": get_args(tp)} if get_origin(tp) is Literal else {}
        # Optional (it has a default): it may be left out, and then sets nothing.
        nargs = {} if required else {"nargs": "?", "default": default}
        target.add_argument(flag.key, metavar=leaf, type=_value(tp), help=help_, **choices, **nargs)
        return
    kw: dict[str, Any] = {"dest": flag.key, "default": default, "help": help_}
    if not config and shown == " (required)":
        kw["required"] = True  # no --config that could give it
    if tp is bool:
        target.add_argument(*flag.names, action=argparse.BooleanOptionalAction, **kw)
    elif get_origin(tp) is Literal:
        target.add_argument(*flag.names, choices=get_args(tp), **kw)
    elif get_origin(tp) is list:
        target.add_argument(*flag.names, action=_Collect, type=_value(tp), metavar=f"{leaf},...", **kw)
    elif get_origin(tp) is dict:
        target.add_argument(*flag.names, action=_Collect, type=_value(tp), metavar="NAME=VALUE,...", **kw)
    else:
        target.add_argument(*flag.names, type=_value(tp), metavar=leaf, **kw)


def config_from_args(
    cls: type[Record],
    args: argparse.Namespace,
    flags: list[Flag] | None = None,
    base: dict[str, Any] | None = None,
    config: bool = True,
) -> Record:
    """The record: `base` (a recipe) < `--config` file < the flags given. config: False when the
    record took no --config (add_flags(config=False)); a `--config` the parser has is another
    record's (train diagnose's is TrainConfig's) or a field's own (jobs status's)."""
    overrides = {f.key: getattr(args, f.key, None) for f in (flags if flags is not None else flags_of(cls))}
    return build(cls, getattr(args, "config", None) if config else None, overrides, base)
