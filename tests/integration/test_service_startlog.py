"""The Start log line ("job ... started by ...") costs nothing when INFO is off."""

from __future__ import annotations

import logging

import pytest

from jobworker.server import service
from jobworker.spec import JobSpec
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect


async def test_start_builds_no_log_text_when_info_is_off(
    connect: harness.Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[JobSpec] = []
    real = service._argv

    def counting(spec: JobSpec) -> str:
        built.append(spec)
        return real(spec)

    monkeypatch.setattr(service, "_argv", counting)
    logger = logging.getLogger(service.__name__)
    before = logger.level
    client = connect("alice")
    try:
        logger.setLevel(logging.WARNING)
        first = await client.start(["true"])
        assert built == []
        # the control: with INFO on, the same Start builds the line once
        logger.setLevel(logging.INFO)
        second = await client.start(["true"])
    finally:
        logger.setLevel(before)
    assert [s.argv for s in built] == [("true",)]
    assert first.id != second.id
