"""Typed dataclass fields: the type check, the `--set key=value` text parser and the
unknown-key message that every softmoe config (`ViTConfig`, `MoEConfig`, `TrainConfig`)
shares. A field's annotation is its type: int, float, str, bool, list[int], dict, a config
dataclass, or a union of those with None (`int | None`)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing


_UnionType = type(int | None)


def options(hint) -> tuple:
    """The types a field accepts: (int, NoneType) for `int | None`, (int,) for `int`."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)


def type_name(hint) -> str:
    names = []
    for t in options(hint):
        if t is type(None):
            names.append("None")
        elif typing.get_origin(t) is list:
            names.append(f"list[{typing.get_args(t)[0].__name__}]")
        else:
            names.append(t.__name__)
    return " or ".join(names)


def is_instance(value, hint) -> bool:
    """isinstance against an annotation; bool is not an int and an int is a float."""
    for t in options(hint):
        if t is type(None):
            ok = value is None
        elif t is bool:
            ok = isinstance(value, bool)
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif typing.get_origin(t) is list:
            ok = isinstance(value, (list, tuple)) and all(is_instance(v, typing.get_args(t)[0]) for v in value)
        else:
            ok = isinstance(value, t)
        if ok:
            return True
    return False


def check_fields(obj, what: str) -> None:
    """ValueError naming the first field of dataclass `obj` whose value does not match its
    annotation, e.g. "TrainConfig field 'steps' must be int, got 'ten' (str)"."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not is_instance(value, hints[f.name]):
            raise ValueError(f"{what} field {f.name!r} must be {type_name(hints[f.name])}, "
                             f"got {value!r} ({type(value).__name__})")


def parse_text(key: str, text: str, hint):
    """The value of `--set key=text` for a field annotated `hint`: none/null for None,
    true/false/yes/no/on/off/1/0 for bools, JSON for lists and dicts, else int / float / str."""
    low = text.strip().lower()
    if type(None) in options(hint) and low in ("none", "null"):
        return None
    for t in sorted(options(hint), key=lambda t: t is str):  # any text is a str: try it last
        if t is bool:
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif t is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif t is float:
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
        elif t is str:
            return text
        elif t is not type(None):  # list[int], dict
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if is_instance(value, t):
                return value
    raise ValueError(f"--set {key}={text}: expected {type_name(hint)}")


def unknown_key_message(key: str, names, what: str = "config key") -> str:
    names = sorted(names)
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {key!r}{hint} (known keys: {', '.join(names)})"


def check_keys(d: dict, cls, what: str, extra=()) -> None:
    """ValueError if `d` has a key that is not a field of dataclass `cls` (nor in `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)} | set(extra)
    for key in d:
        if key not in names:
            raise ValueError(unknown_key_message(key, names, what))


def split_assignment(item: str) -> tuple[str, str]:
    """"key=value" -> (key, value); ValueError otherwise."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    return key.strip(), text
