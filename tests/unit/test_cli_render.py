"""How the CLI shows jobs: what another user chose (owner, argv) cannot drive the terminal."""

from __future__ import annotations

from datetime import UTC, datetime

from jobworker.client.cli.render import list_text, status_text
from jobworker.spec import JobState, JobStatus


def test_control_characters_in_owner_and_argv_are_escaped() -> None:
    status = JobStatus(
        id="j1",
        state=JobState.RUNNING,
        argv=("echo", "\x1b]0;pwned\x07"),
        owner="mallory\x1b[2J",
        pid=1,
        started_at=datetime.now(UTC),
    )
    for text in (status_text(status), list_text([status])):
        assert "\x1b" not in text and "\x07" not in text, text
        assert "\\x1b[2J" in text and "\\x07" in text
