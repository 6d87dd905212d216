"""The daemon's log handler setup (jobworker.server.logs.setup)."""

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from jobworker.server import logs


class _Stream(io.StringIO):
    """Records which thread each write came from."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def write(self, s: str) -> int:
        self.writers.add(threading.current_thread().name)
        return super().write(s)


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (setup replaces its handlers)."""
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    try:
        yield logger
    finally:
        logs.shutdown()
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.mark.parametrize("log_format", logs.FORMATS)
def test_records_are_formatted_and_written_off_the_logging_thread(
    root: logging.Logger, log_format: str
) -> None:
    stream = _Stream()
    logs.setup("info", log_format, stream)
    log = logging.getLogger("jobworker.test")
    log.info("job %s started by %s", "j1", "alice")
    logs.audit(
        method="Start",
        code="OK",
        peer="ipv4:127.0.0.1:1",
        identity="alice",
        role="user",
        job="j1",
        duration=0.0015,
    )
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    logs.shutdown()  # every record queued so far is written when it returns
    lines = stream.getvalue().splitlines()
    assert threading.current_thread().name not in stream.writers
    assert stream.writers
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert [r["message"] for r in records] == [
            "job j1 started by alice",
            "rpc method=Start code=OK peer=ipv4:127.0.0.1:1 identity=alice role=user job=j1 "
            "duration_ms=1.5",
            "it failed",
        ]
        assert records[1]["duration_ms"] == 1.5 and records[1]["job"] == "j1"
        assert "ValueError: boom" in records[2]["exception"]
        assert "exception" not in records[0]
    else:
        assert lines[0].endswith(" INFO jobworker.test: job j1 started by alice")
        assert lines[1].endswith(
            " INFO jobworker.audit: rpc method=Start code=OK peer=ipv4:127.0.0.1:1 "
            "identity=alice role=user job=j1 duration_ms=1.5"
        )
        assert lines[2].endswith(" ERROR jobworker.test: it failed")
        assert lines[3] == "Traceback (most recent call last):"
        assert lines[-1] == "ValueError: boom"


def test_setup_twice_leaves_one_writer(root: logging.Logger) -> None:
    threads = threading.active_count()
    first, second = _Stream(), _Stream()
    logs.setup("info", "text", first)
    logs.setup("info", "text", second)
    logging.getLogger("jobworker.test").warning("once")
    logs.shutdown()
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert threading.active_count() == threads


def test_after_shutdown_records_are_written_at_once(root: logging.Logger) -> None:
    stream = _Stream()
    logs.setup("info", "text", stream)
    logs.shutdown()
    logging.getLogger("jobworker.test").warning("late")
    assert stream.getvalue().rstrip().endswith("WARNING jobworker.test: late")
