"""``worker logs --timestamps`` and ``--since``: line prefixes and the time to start from."""

from __future__ import annotations

from datetime import UTC, datetime

from jobworker.errors import InvalidArgument
from jobworker.units import DURATION_FORM, parse_duration


def rfc3339(time_us: int) -> str:
    """``2026-12-02T07:20:00.123456Z``: RFC 3339, UTC, microseconds."""
    seconds, micros = divmod(time_us, 1_000_000)
    when = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Stamper:
    """Prefixes each line with the time its first byte was received, as ``kubectl logs
    --timestamps`` does. Lines are counted per destination (``key``): a line cut by a chunk
    boundary, or by the other stream's bytes going elsewhere, keeps its first byte's time."""

    def __init__(self) -> None:
        self._at_start: dict[int, bool] = {}

    def stamp(self, key: int, data: bytes, time_us: int) -> bytes:
        if not data:
            return data
        prefix = rfc3339(time_us).encode() + b" "
        at_start = self._at_start.get(key, True)
        lines = data.split(b"\n")
        out: list[bytes] = []
        for k, line in enumerate(lines):
            last = k == len(lines) - 1
            if last and not line:
                break  # the data ended with a newline: the next line starts afresh
            if at_start:
                out.append(prefix)
            out.append(line)
            if not last:
                out.append(b"\n")
        self._at_start[key] = data.endswith(b"\n")
        return b"".join(out)


def parse_since(text: str, now: datetime | None = None) -> int:
    """``--since``: a duration back from now (``10m``) or an RFC 3339 time
    (``2026-12-02T07:00:00Z``); µs since the epoch."""
    try:
        seconds = parse_duration(text, "--since")
    except InvalidArgument:
        pass
    else:
        now = now or datetime.now(UTC)
        return int(now.timestamp() * 1_000_000) - int(seconds * 1_000_000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"--since: {text!r} is neither a duration ({DURATION_FORM}) nor an RFC 3339 time "
            "(e.g. 2026-12-02T07:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise InvalidArgument(f"--since: {text!r} has no time zone; add Z for UTC, or +HH:MM")
    return int(when.timestamp() * 1_000_000)
