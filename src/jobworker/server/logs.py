"""The daemon's log output: plain text for people, JSON lines for log shippers
(``workerd --log-format``), and the audit line every RPC leaves (:func:`audit`).

The audit line goes to the ``jobworker.audit`` logger at INFO, one per RPC whatever its outcome;
its fields ride on the record as ``record.audit`` (a dict), so the JSON formatter writes them as
keys of their own while the text format has them in the message as ``key=value``.

Formatting and writing happen on a thread of their own (the standard library's
:class:`~logging.handlers.QueueListener`): the caller, the event loop serving RPCs,
only merges a record's arguments into its message and queues it. :func:`shutdown` writes what
is queued (the daemon calls it before it exits, and so does ``atexit``).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
from datetime import UTC, datetime
from typing import Final, TextIO

AUDIT_LOGGER: Final = "jobworker.audit"
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_FIELDS: Final = ("method", "code", "peer", "identity", "role", "job", "duration_ms")
"""The keys of an audit record, in the order of the text line."""

_audit_log = logging.getLogger(AUDIT_LOGGER)
_listeners: list[logging.handlers.QueueListener] = []
"""The running writer, if any (at most one)."""
_listener_lock = threading.Lock()


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


class _Queueing(logging.handlers.QueueHandler):
    """Queues a record with its message merged (its arguments may change after the call) and
    its traceback as text (``exc_text``, which both formatters write as they would
    ``exc_info``); what is left of the formatting is the writer thread's."""

    _traceback = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self._traceback.formatException(record.exc_info)
            record.exc_info = None
        return record


def setup(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Configure the root logger: ``level`` (``info``, ...), records written to ``stream``
    (default stderr) with the ``log_format`` formatter, by the writer thread. Called again,
    it replaces the previous setup (what that had queued is written first)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    with _listener_lock:
        _stop()
        logging.basicConfig(level=level.upper(), handlers=[_Queueing(records)], force=True)
        listener.start()
        _listeners.append(listener)


def shutdown() -> None:
    """Write every record queued so far and stop the writer thread; later records are written
    by the caller, as they come. Idempotent."""
    with _listener_lock:
        _stop()


def _stop() -> None:
    while _listeners:
        listener = _listeners.pop()
        listener.stop()
        root = logging.getLogger()
        for queueing in [h for h in root.handlers if isinstance(h, _Queueing)]:
            if queueing.queue is listener.queue:
                root.removeHandler(queueing)
                for handler in listener.handlers:
                    root.addHandler(handler)


atexit.register(shutdown)


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
