import os
from pathlib import Path

import pytest

from jobworker.errors import InvalidArgument, SpawnError
from jobworker.spawn.lookup import resolve_command
from jobworker.spec import MAX_ARGV_ENV_BYTES, MINIMAL_ENV, JobSpec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"argv": ()}, "non-empty"),
        ({"argv": "ls"}, "non-empty list"),
        ({"argv": ("",)}, "argv\\[0\\]"),
        ({"argv": ("ls", "a\0b")}, "argv\\[1\\] contains a NUL"),
        ({"argv": ("ls",), "env": {"A=B": "x"}}, "contain no '='"),
        ({"argv": ("ls",), "env": {"": "x"}}, "non-empty"),
        ({"argv": ("ls",), "env": {"A": "x\0"}}, "NUL"),
        ({"argv": ("ls",), "cwd": "relative"}, "absolute"),
        ({"argv": ("ls", "x" * (128 * 1024 + 1))}, "longer than"),
        ({"argv": ("ls",) + ("y" * 100_000,) * 11}, str(MAX_ARGV_ENV_BYTES)),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        JobSpec(**kwargs)  # type: ignore[arg-type]


def test_env_is_minimal_plus_request() -> None:
    spec = JobSpec(argv=("env",), env={"FOO": "1", "PATH": "/opt/bin"})
    env = spec.full_env()
    assert env["FOO"] == "1"
    assert env["PATH"] == "/opt/bin"
    assert set(env) == set(MINIMAL_ENV) | {"FOO"}


def test_argv_list_becomes_tuple() -> None:
    assert JobSpec(argv=["ls", "-l"]).argv == ("ls", "-l")  # type: ignore[arg-type]


def test_resolve_command(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    plain = tmp_path / "data.txt"
    plain.write_text("x")
    path = f"/nonexistent:{tmp_path}"
    assert resolve_command("run.sh", path, "/") == str(script)
    assert resolve_command(str(script), "", "/") == str(script)
    assert resolve_command("./run.sh", "", str(tmp_path)) == os.path.join(str(tmp_path), "./run.sh")
    with pytest.raises(SpawnError, match="command not found: 'nope'"):
        resolve_command("nope", path, "/")
    with pytest.raises(SpawnError, match="not an executable"):
        resolve_command(str(plain), path, "/")
    with pytest.raises(SpawnError, match="not an executable"):
        resolve_command(str(tmp_path), path, "/")
    with pytest.raises(SpawnError, match="working directory"):
        resolve_command("run.sh", path, str(tmp_path / "missing"))


def test_a_sandboxed_job_needs_room_for_its_init() -> None:
    from jobworker.limits import Limits
    from jobworker.spec import Sandbox

    with pytest.raises(InvalidArgument, match="init counts as a task"):
        JobSpec(argv=("true",), limits=Limits(pids=1), sandbox=Sandbox())
    JobSpec(argv=("true",), limits=Limits(pids=2), sandbox=Sandbox())
    JobSpec(argv=("true",), limits=Limits(pids=1))  # unsandboxed: the job alone
