"""Run a snippet of Python as ``nobody`` (uid 65534 here), for tests of what other accounts
(jobs) can reach. The test's own interpreter may sit where nobody cannot traverse (a venv under
/root or /work), so the first interpreter nobody can execute is used; a snippet must therefore
need nothing but the standard library."""

from __future__ import annotations

import functools
import os
import pwd
import subprocess
import sys
import textwrap

import pytest

NOBODY = pwd.getpwnam("nobody")


def _runs_as_nobody(python: str) -> bool:
    try:
        subprocess.run(
            [python, "-I", "-S", "-c", "pass"],
            user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@functools.cache
def python_for_nobody() -> str | None:
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    return next((p for p in candidates if os.path.exists(p) and _runs_as_nobody(p)), None)


def run_as_nobody(code: str) -> str:
    """Run ``code`` as nobody (no supplementary groups); its stdout, stripped. Skips the test
    when not root or no interpreter is executable by nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that nobody may execute")
    proc = subprocess.run(
        [python, "-I", "-S", "-c", textwrap.dedent(code)],
        user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def attempt(op: str) -> str:
    """Source that runs the statement ``op`` and prints ``ok``, or the name of the OSError it
    raised and its errno name (e.g. ``PermissionError EACCES``)."""
    return f"""
        import errno, os, socket
        try:
            {op}
        except OSError as e:
            print(type(e).__name__, errno.errorcode.get(e.errno, e.errno))
        else:
            print("ok")
    """
