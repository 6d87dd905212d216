"""The daemon's log output: plain text for people, JSON lines for log shippers
(``workerd --log-format``), and the audit line every RPC leaves (:func:`audit`).

The audit line goes to the ``jobworker.audit`` logger at INFO, one per RPC whatever its outcome;
its fields ride on the record as ``record.audit`` (a dict), so the JSON formatter writes them as
keys of their own while the text format has them in the message as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final, TextIO

AUDIT_LOGGER: Final = "jobworker.audit"
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_FIELDS: Final = ("method", "code", "peer", "identity", "role", "job", "duration_ms")
"""The keys of an audit record, in the order of the text line."""

_audit_log = logging.getLogger(AUDIT_LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the audit fields when the record is an audit line, ``exception`` when it has one. Non-ASCII
    and control characters are escaped, so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``--log-format`` (one of :data:`FORMATS`)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r}: must be one of {', '.join(FORMATS)}")


def setup(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Configure the root logger: ``level`` (``info``, ...), one handler on ``stream``
    (default stderr) with the ``log_format`` formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def audit(
    *,
    method: str,
    code: str,
    peer: str,
    identity: str,
    role: str,
    job: str,
    duration: float,
) -> None:
    """Log the audit line of one RPC. Every string must already be escaped for a log line
    (:func:`jobworker.server.accounts.printable`); ``"-"`` stands for what is unknown (the
    identity of a caller that did not authenticate, the job of a call that names none)."""
    fields: dict[str, object] = {
        "method": method,
        "code": code,
        "peer": peer,
        "identity": identity,
        "role": role,
        "job": job,
        "duration_ms": round(duration * 1000, 3),
    }
    if _audit_log.isEnabledFor(logging.INFO):
        text = " ".join(f"{k}={fields[k]}" for k in AUDIT_FIELDS)
        _audit_log.info("rpc %s", text, extra={"audit": fields})
