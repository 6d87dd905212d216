"""The layers: the core works without grpc, the spawner script stands alone, the layer contract
in ``make lint`` covers every module and fails on an import against the layers, and only the
daemon touches the process-wide TLS setting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "jobworker"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def test_core_library_does_not_import_grpc() -> None:
    code = (
        "import sys, jobworker, jobworker.manager, jobworker.cgroup.controllers;"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["child.py", "sandbox_child.py"])
def test_spawner_script_imports_only_the_standard_library(script: str) -> None:
    """child.py runs as a plain script and loads sandbox_child.py by path: neither may import
    anything from jobworker."""
    path = str(SRC / "spawn" / script)
    code = (
        f"import runpy, sys; runpy.run_path({path!r}, run_name='not_main');"
        "print(sorted(m for m in sys.modules if m.startswith('jobworker')))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_top_level_module_has_a_layer() -> None:
    """A new module at the top of the package must be put in the core contract (or in a side
    package), or the contract would silently not cover it."""
    (core,) = [c for c in _contracts() if c["id"] == "core"]
    listed = set(core["source_modules"])  # type: ignore[call-overload]
    sides = {"api", "server", "client", "__init__", "__main__"}
    present = {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__pycache__"
    }
    unlisted = {f"jobworker.{m}" for m in present - sides} - listed
    assert not unlisted, f"modules in no layer of [tool.importlinter]: {sorted(unlisted)}"
    missing = listed - {f"jobworker.{m}" for m in present}
    assert not missing, f"the core contract lists modules that do not exist: {sorted(missing)}"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("manager.py", "import jobworker.server.service", "The core never imports"),
        ("cgroup/fs.py", "import grpc", "The core never imports"),
        ("client/client.py", "import jobworker.server.authz", "never import each other"),
        ("server/service.py", "import jobworker.client.pki", "never import each other"),
        ("server/daemon.py", "import jobworker.api.v1.jobworker_pb2", "only through jobworker.api"),
        ("api/convert.py", "import jobworker.server.policy", "The wire layer never imports"),
    ],
)
def test_an_import_against_the_layers_breaks_the_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(SRC, tree / "src" / "jobworker", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    assert _lint_imports(tree).returncode == 0, "the copied tree must pass before the change"
    target = tree / "src" / "jobworker" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = _lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_importing_the_client_leaves_the_environment_alone() -> None:
    """The cipher restriction is process-wide: an embedder of the client may talk TLS 1.2 gRPC
    to something else. Only importing the daemon's side may set it."""
    code = (
        "import os; before = dict(os.environ);"
        "import jobworker.client, jobworker.client.cli, grpc;"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items());"
        "import jobworker.server.service;"
        "print(os.environ.get('GRPC_SSL_CIPHER_SUITES'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    # Imported after grpc, the daemon's module cannot set it any more; it says so instead.
    assert out.stdout.strip() == "None"


def test_no_module_is_over_500_lines() -> None:
    """A module that grows past 500 lines holds more than one job: split it (generated code
    aside)."""
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if "_pb2" not in p.name and (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"modules over 500 lines: {long}"
