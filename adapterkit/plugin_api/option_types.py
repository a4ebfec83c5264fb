"""Typing a trainer's own options: the values of ``--set KEY=VALUE`` and a recipe's
``trainer_options:`` (strings, numbers, lists) as the fields of its options dataclass say, and
the check, at registration, that such a dataclass can be typed at all.

It lives with the plugin API, not with training, because registration runs it at every CLI
start-up (nothing here imports torch) and a plugin author's mistake is told then.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

#: The annotations a trainer's options may use (docs/plugins.md promises them to plugins).
OPTION_TYPES = "bool, int, float, str, dict, Literal[...], list[X] of these, any of them | None"


def options_class_problems(schema: Any) -> list[str]:
    """Why ``schema`` cannot be a ``Trainer.options`` (empty when it can), one line each: not a
    dataclass class, annotations that do not resolve or are not among :data:`OPTION_TYPES`
    (``--set`` would pass their strings through), defaults not of their field's type (a
    run that sets nothing would train with them).

    Registration calls it, so a plugin's mistake is a warning at start-up, not a failed run.
    """
    if not dataclasses.is_dataclass(schema):
        return [f"options = {schema!r} is not a dataclass: declare one with @dataclass "
                f"and name the class (options = MyOptions)"]
    if not isinstance(schema, type):
        return [f"options = an instance of {type(schema).__name__}: name the class itself "
                f"(options = {type(schema).__name__})"]
    try:
        hints = get_type_hints(schema)
    except Exception as exc:  # a plugin's annotation that does not resolve: its bug, not yours
        return [f"the type hints of {schema.__name__} cannot be read ({exc}): import what "
                "they name at the module's top level"]
    problems, unsupported = [], []
    for f in dataclasses.fields(schema):
        if not f.init:
            continue  # not an option: nothing given reaches it
        where = f"{schema.__name__}.{f.name}"
        if not _option_type_supported(hints[f.name]):
            unsupported.append(f"{where} ({_spelled(hints[f.name])})")
            continue
        try:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
        except Exception as exc:
            problems.append(f"{where}'s default_factory raised {type(exc).__name__}: {exc} (it must "
                            "return the default)")
            continue
        if default is dataclasses.MISSING:
            continue  # required: nothing to check until it is given
        if isinstance(default, float) and not math.isfinite(default) \
                and without_none(hints[f.name])[0] is float:
            continue  # float("inf") as "no limit": a default, though --set refuses it as a value
        failed: list[str] = []
        if coerce_option(f.name, default, hints[f.name], failed) != default or failed:
            problems.append(f"{where} defaults to {default!r}, which is not "
                            f"{describe_option(hints[f.name])}: give a default of its type")
    if unsupported:  # --set could only pass their strings through
        problems.insert(0, f"{', '.join(unsupported)}: trainer options take only "
                           f"{OPTION_TYPES} (take a str and convert it in __post_init__)")
    return problems


def _option_type_supported(kind: Any) -> bool:
    """True when :func:`coerce_option` types values of the hint ``kind``."""
    kind, _ = without_none(kind)
    origin = get_origin(kind) or kind
    if origin is list:
        return not get_args(kind) or _option_type_supported(get_args(kind)[0])
    return origin is Literal or origin is dict or kind in (bool, int, float, str)


def _spelled(kind: Any) -> str:
    """The hint ``kind`` as its author wrote it (``Path``, ``tuple[int, int]``)."""
    if isinstance(kind, type) and not get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "")


def coerce_option(name: str, value: Any, kind: Any, problems: list[str]) -> Any:
    """``value`` (from YAML or ``--set``: a string, number, bool or list) as the type hint
    ``kind`` says, or None with the problem recorded in ``problems``.

    Understands ``bool``, ``int``, ``float`` (``1%`` reads as 1.0), ``str`` (a list is joined
    with commas), ``dict``, ``list[X]`` (a list, or a comma-separated string), ``Literal[...]``
    (matched case-insensitively, so ``true`` matches ``"true"``) and any of them ``| None``.
    """
    kind, nullable = without_none(kind)
    if value is None:
        return None if nullable else _fail(name, value, "a value", problems)
    origin = get_origin(kind) or kind
    try:
        if origin is Literal:
            for choice in get_args(kind):
                if str(choice).lower() == str(value).lower():
                    return choice
            return _fail(name, value, describe_option(kind), problems)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            return _fail(name, value, "true or false", problems)
        if origin is dict:
            return dict(value) if isinstance(value, dict) else _fail(name, value, "a mapping", problems)
        if origin is list:
            items = [v.strip() for v in value.split(",") if v.strip()] \
                if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                return _fail(name, value, "a list", problems)
            item_kind = (get_args(kind) or (str,))[0]
            return [coerce_option(f"{name}[{i}]", item, item_kind, problems)
                    for i, item in enumerate(items)]
        if kind in (int, float) and isinstance(value, bool):  # YAML's true is not 1
            return _fail(name, value, describe_option(kind), problems)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                return _fail(name, value, "an integer", problems)
            return int(value)
        if kind is float:
            if isinstance(value, str) and value.endswith("%"):
                value = value[:-1]
            number = float(value)
            # nan passes every range check (each comparison is false) and inf is no setting
            if not math.isfinite(number):
                return _fail(name, value, "a finite number", problems)
            return number
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return str(value)
    except (TypeError, ValueError):
        return _fail(name, value, getattr(kind, "__name__", str(kind)), problems)


def without_none(kind: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (itself, False)."""
    if get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind):
        rest = [a for a in get_args(kind) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else kind), True
    return kind, False


def describe_option(kind: Any) -> str:
    """What a value of the type hint ``kind`` looks like, in a user's words."""
    kind, _ = without_none(kind)
    origin = get_origin(kind) or kind
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    words = {bool: "true or false", int: "an integer", float: "a number", dict: "a mapping",
             list: "a list (YAML [a, b] or a,b; [] for none)", str: "a string"}
    return words.get(origin, getattr(kind, "__name__", str(kind)))


def _fail(name: str, value: Any, expected: str, problems: list[str]) -> None:
    problems.append(f"{name}: expected {expected}, got {value!r}")
    return None
