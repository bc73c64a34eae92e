"""Settings as dataclass fields whose metadata carries their help and bounds.

Shared by the run config (fedit/config.py) and the strategies' options
(fedit/strategies/), so both are validated and documented the same way and
neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# The largest whole number a setting takes unless its field names another ``max``: a signed 32-bit integer,
# more rounds, clients, steps or tokens than any run reaches, and what every library downstream (numpy,
# torch, C kernels) holds without overflow. A count beyond it is a typo, not a plan.
INT_MAX = 2**31 - 1


def option(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text and bounds (min, max, exclusive_min, exclusive_max, choices; for a list
    of names, choices applies to each name and empty=True allows an empty list). Every number must be
    finite; a whole number without its own max is bounded by INT_MAX."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def check_value(where: str, fld: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """Coerce ``value`` to the field's type; return (value, problem or None)."""
    default = fld.default
    meta = fld.metadata
    if meta.get("amount"):
        return check_amount(where, value, meta)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return value, f"{where} = {value!r}: expected true or false"
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{where} = {value!r}: expected a whole number"
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{where} = {value!r}: expected a number"
        try:
            value = float(value)
        except OverflowError:  # a whole number past float's range (TOML reads 10**400 as an int)
            return value, f"{where} = {value!r}: must be a finite number"
        # nan compares False with every bound, so without this it would pass them all
        if not math.isfinite(value):
            return value, f"{where} = {value!r}: must be a finite number (not nan or infinity)"
    elif isinstance(default, tuple) and meta.get("items") is int:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            return value, f"{where} = {value!r}: expected a list of whole numbers"
        big = [v for v in value if abs(v) > INT_MAX]
        if big:
            return value, f"{where} = {list(value)!r}: {', '.join(map(str, big))} beyond ±{INT_MAX}"
        value = tuple(value)
    elif isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        empty_ok = meta.get("empty", False)
        if not isinstance(value, (list, tuple)) or not (value or empty_ok) or not all(isinstance(v, str)
                                                                                      for v in value):
            return value, f"{where} = {value!r}: expected a {'' if empty_ok else 'non-empty '}list of names"
        value = tuple(value)
        bad = [v for v in value if "choices" in meta and v not in meta["choices"]]
        if bad:
            return value, f"{where} = {list(value)!r}: {', '.join(map(repr, bad))} unknown; choose from " \
                          f"{', '.join(meta['choices'])}"
        return value, None
    elif isinstance(default, str):
        if not isinstance(value, str):
            return value, f"{where} = {value!r}: expected a string"
    if "choices" in meta and value not in meta["choices"]:
        return value, f"{where} = {value!r}: choose one of {', '.join(meta['choices'])}"
    if "min" in meta and (value < meta["min"] or (meta.get("exclusive_min") and value == meta["min"])):
        op = ">" if meta.get("exclusive_min") else ">="
        return value, f"{where} = {value!r}: must be {op} {meta['min']}"
    if "max" in meta and (value > meta["max"] or (meta.get("exclusive_max") and value == meta["max"])):
        op = "<" if meta.get("exclusive_max") else "<="
        return value, f"{where} = {value!r}: must be {op} {meta['max']}"
    if isinstance(value, int) and not isinstance(value, bool) and "max" not in meta and abs(value) > INT_MAX:
        return value, f"{where} = {value!r}: must be {'<=' if value > 0 else '>='} {INT_MAX if value > 0 else -INT_MAX}"
    return value, None


def check_amount(where: str, value: Any, meta: dict) -> tuple[Any, str | None]:
    """A share of a set or a number of its members: a fraction in (0, 1), a whole number from 1, or
    (where ``meta["amount"]`` names it, e.g. "all") a word; 0 where ``meta["zero"]`` allows it (none)."""
    word = meta["amount"] if isinstance(meta["amount"], str) else None
    if word and value == word:
        return value, None
    expected = (f"{where} = {value!r}: expected a fraction between 0 and 1 (e.g. 0.1) or a whole number of "
                f"records or clients (e.g. 5)" + (f", or {word!r}" if word else "")
                + (", or 0 for none" if meta.get("zero") else ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        return value, expected
    if value == 0 and meta.get("zero"):
        return 0, None
    if 0 < value < 1:
        return float(value), None
    if value >= 1 and float(value).is_integer():
        return int(value), None
    return value, expected


def amount_of(amount: Any, total: int, word_means_all: bool = True) -> int:
    """How many of ``total`` an amount (see check_amount) names: a fraction rounds up (a client of 4
    records at 0.1 spares 1), a count is capped at ``total``."""
    import math

    if isinstance(amount, str):
        return total if word_means_all else 0
    if 0 < amount < 1:
        return min(total, math.ceil(amount * total))
    return min(total, int(amount))


def fill(cls: type, given: dict[str, Any], section: str, problems: list[str]) -> Any | None:
    """An instance of the dataclass ``cls`` from ``given``; problems appended, None if there were any."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values, before = {}, len(problems)
    for key, value in given.items():
        if key not in fields:
            problems.append(f"unknown key {section}.{key}; known keys: {', '.join(fields) or 'none'}")
            continue
        values[key], problem = check_value(f"{section}.{key}", fields[key], value)
        if problem:
            problems.append(problem)
    return cls(**values) if len(problems) == before else None


def describe(cls: type, section: str, indent: str = "  ") -> list[str]:
    """``section.key = default`` and the help of every field, for --help-config."""
    return [f"{indent}{section}.{f.name} = {f.default!r}\n{indent}    {f.metadata['help']}"
            for f in dataclasses.fields(cls)]
