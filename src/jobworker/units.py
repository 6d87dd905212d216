"""Human units, parsed here and only here: sizes and rates in powers of 1024, whole counts.

``K``, ``M``, ``G``, ``T``, ``P`` are powers of 1024 (``KiB``... and ``KB``... are accepted as
the same), as systemd and cgroupfs users expect. Errors are
:class:`~jobworker.errors.InvalidArgument` naming the field and the accepted form.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from jobworker.errors import InvalidArgument

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)

SIZE_FORM = "bytes, or a number with K, M, G or T (powers of 1024), e.g. 1024, 512M, 1.5G"
RATE_FORM = "bytes per second, or a number with K, M, G or T, e.g. 10M or 10M/s"


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _scaled(text: str, field: str, form: str) -> int:
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"{field}: {text!r} is not understood; use {form}")
    try:
        value = Decimal(m.group(1)) * UNITS[m.group(2).upper()]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise InvalidArgument(f"{field}: {text!r} is not understood; use {form}") from e
    if value != value.to_integral_value():
        raise InvalidArgument(f"{field}: {text!r} is not a whole number of bytes; use {form}")
    return int(value)


def parse_size(text: str | int, field: str = "memory") -> int:
    """``"512M"`` -> 536870912; ``"1.5G"``; ``"1024"`` (bytes). Must be positive."""
    value = text if is_int(text) else _scaled(str(text), field, SIZE_FORM)
    assert isinstance(value, int)
    if value <= 0:
        raise InvalidArgument(f"{field} must be positive, got {text!r}; use {SIZE_FORM}")
    return value


def parse_rate(text: str | int, field: str = "io rate") -> int:
    """Bytes per second: ``"10M"``, ``"10M/s"``, ``"10MiB/s"``, ``"1048576"``."""
    if is_int(text):
        value = text
    else:
        raw = str(text).strip()
        raw = raw[:-2] if raw.lower().endswith("/s") else raw
        value = _scaled(raw, field, RATE_FORM)
    assert isinstance(value, int)
    if value <= 0:
        raise InvalidArgument(f"{field} must be positive, got {text!r}; use {RATE_FORM}")
    return value


def parse_count(text: str | int, field: str, upper: int, form: str) -> int:
    """A whole number from 1 to ``upper``: ``"64"`` or ``64``."""
    if is_int(text):
        value = text
    else:
        raw = str(text).strip()
        if not raw.isdigit():
            raise InvalidArgument(f"{field}: {text!r} is not a whole number; use {form}")
        value = int(raw)
    assert isinstance(value, int)
    if not 1 <= value <= upper:
        raise InvalidArgument(f"{field} must be from 1 to {upper}, got {text!r}")
    return value


def parse_float(text: str | float, field: str, form: str) -> float:
    """A decimal number: ``"0.5"``, ``2``; range checks are the caller's."""
    if isinstance(text, bool):
        raise InvalidArgument(f"{field}: {text!r} is not a number; use {form}")
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(text.strip())
    except ValueError:
        raise InvalidArgument(f"{field}: {text!r} is not a number; use {form}") from None


def format_size(n: int) -> str:
    """The shortest exact form: 536870912 -> ``"512M"``, 1000 -> ``"1000"``."""
    for unit in ("T", "G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


DURATION_FORM = "seconds, or a number with ms, s, m, h or d, e.g. 30s, 10m, 1.5h"
_DURATION_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float, field: str = "timeout") -> float:
    """Seconds: ``"30s"``, ``"10m"``, ``"1.5h"``, ``"500ms"``, ``"90"`` or ``90``. Must be
    positive and finite."""
    if isinstance(text, bool):
        raise InvalidArgument(f"{field}: {text!r} is not a duration; use {DURATION_FORM}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION_RE.fullmatch(str(text))
        if m is None:
            raise InvalidArgument(f"{field}: {text!r} is not understood; use {DURATION_FORM}")
        value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{field} must be positive, got {text!r}; use {DURATION_FORM}")
    return value


def format_duration(seconds: float) -> str:
    """The shortest exact form: 30 -> ``"30s"``, 5400 -> ``"90m"``, 3600 -> ``"1h"``, 0.5 ->
    ``"0.5s"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"
