"""``workerd --config FILE``: every option a TOML key; flags > env (WORKERD_*) > file >
defaults, shown by ``workerd --print-config``; unknown keys refused at start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from jobworker.server import config as config_file
from jobworker.server.daemon import main

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def _workerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKERD_")}
    return subprocess.run(
        [sys.executable, "-m", "jobworker.server.daemon", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _settings(out: str) -> dict[str, tuple[str, str]]:
    """--print-config's lines -> key: (value, source); value ``unset`` for unset ones."""
    settings = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+) = (.*)  # (\w+)", line) or re.fullmatch(
            r"# (\S+) (unset)  # (\w+)", line
        )
        assert m, line
        settings[m.group(1)] = (m.group(2), m.group(3))
    return settings


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    conf = tmp_path / "workerd.toml"
    conf.write_text(
        'listen = "10.0.0.1:1"\n'  # flag and env too: the flag wins
        'cgroup-name = "from-file"\n'  # env too: env wins
        "stop_grace = 7\n"  # an int for a float option, `_` for `-`
        'max-memory = "8G"\n'  # a size
        'default-io = ["/dev/null=10M", "/dev/zero=rbps=1M"]\n'  # a list
        'default-network = "none"\n'
    )
    result = _workerd(
        "--config", str(conf), "--listen", "10.0.0.3:3", "--print-config",
        env={"WORKERD_LISTEN": "10.0.0.2:2", "WORKERD_CGROUP_NAME": "from-env"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    s = _settings(result.stdout)
    assert s["listen"] == ('"10.0.0.3:3"', "flag")
    assert s["cgroup-name"] == ('"from-env"', "env")
    assert s["stop-grace"] == ("7.0", "file")
    assert s["max-memory"] == ('"8G"', "file")
    assert s["default-io"] == ('["/dev/null=10M", "/dev/zero=rbps=1M"]', "file")
    assert s["default-network"] == ('"none"', "file")
    assert s["state-dir"] == ('"/var/lib/jobworker"', "default")
    assert s["pki"] == ("unset", "default")
    assert s["config"] == (f'"{conf}"', "flag")
    # Every option of the command is listed (and nothing else but the file itself).
    names = {config_file._long_name(o) for o in config_file.options(main)}
    assert set(s) == names | {"config"}


def test_env_beats_file_and_file_beats_default_for_a_list(tmp_path: Path) -> None:
    conf = tmp_path / "workerd.toml"
    conf.write_text('max-io = ["/dev/null=1M"]\nmax-pids = "100"\n')
    result = _workerd(
        "--print-config", env={"WORKERD_CONFIG": str(conf), "WORKERD_MAX_IO": "/dev/zero=2M"}
    )
    assert result.returncode == 0, result.stderr
    s = _settings(result.stdout)
    assert s["max-io"] == ('["/dev/zero=2M"]', "env")
    assert s["max-pids"] == ('"100"', "file")
    assert s["config"] == (f'"{conf}"', "env")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "workerd.toml"
    conf.write_text('listen = "127.0.0.1:1"\nmax-memroy = "8G"\n')
    result = _workerd("--config", str(conf), "--print-config")
    assert result.returncode == 2
    assert "max-memroy" in result.stderr and str(conf) in result.stderr, result.stderr
    assert result.stdout == ""


def test_bad_values_are_refused_naming_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "workerd.toml"
    for body, words in (
        ('stop-grace = "soon"\n', ["stop-grace", "soon"]),
        ('listen = ["a", "b"]\n', ["listen", "one value"]),
        ("max-memory = true\n", ["max-memory", "true/false"]),
        ("[listen]\nx = 1\n", ["listen", "table"]),
        ('listen = "a"\nlisten_ = 1\n', ["listen_"]),
        ("print-config = true\n", ["print-config", "command-line"]),
        ("listen = \n", ["not valid TOML"]),
    ):
        conf.write_text(body)
        result = _workerd("--config", str(conf), "--print-config")
        assert result.returncode == 2, (body, result.stdout)
        for word in [str(conf), *words]:
            assert word in result.stderr, (body, result.stderr)
    result = _workerd("--config", str(tmp_path / "missing.toml"), "--print-config")
    assert result.returncode == 2 and "missing.toml" in result.stderr


def test_a_bool_and_an_int_option_through_the_file(tmp_path: Path) -> None:
    """Generic over click's options: a flag and an int option that workerd may not have yet
    get their file values (and keep the precedence), on a command built the same way."""

    @click.command()
    @click.option(
        "--config",
        is_eager=True,
        expose_value=False,
        callback=config_file.callback,
        type=click.Path(path_type=Path),
    )
    @click.option("--print-config", is_flag=True)
    @click.option("--no-sandbox", is_flag=True, envvar="T_NO_SANDBOX")
    @click.option("--workers", type=int, default=1, envvar="T_WORKERS")
    def cmd(print_config: bool, no_sandbox: bool, workers: int) -> None:
        click.echo("\n".join(config_file.describe(click.get_current_context())))
        click.echo(f"values {no_sandbox!r} {workers!r}")  # fmt: skip

    conf = tmp_path / "t.toml"
    conf.write_text("no_sandbox = true\nworkers = 4\n")
    out = CliRunner().invoke(cmd, ["--config", str(conf)], env={})
    assert out.exit_code == 0, out.output
    assert "no-sandbox = true  # file" in out.output
    assert "workers = 4  # file" in out.output
    assert "values True 4" in out.output
    out = CliRunner().invoke(cmd, ["--config", str(conf), "--workers", "5"], env={"T_WORKERS": "6"})
    assert "workers = 5  # flag" in out.output and "values True 5" in out.output
    out = CliRunner().invoke(cmd, ["--config", str(conf)], env={"T_WORKERS": "6"})
    assert "workers = 6  # env" in out.output
    conf.write_text('workers = "many"\n')
    out = CliRunner().invoke(cmd, ["--config", str(conf)])
    assert out.exit_code == 2 and "workers" in out.output and "many" in out.output


def test_the_contrib_example_is_valid() -> None:
    result = _workerd("--config", str(CONTRIB / "workerd.toml"), "--print-config")
    assert result.returncode == 0, result.stderr
    s = _settings(result.stdout)
    assert s["pki"] == ('"/etc/jobworker/pki"', "file")
    unit = (CONTRIB / "workerd.service").read_text()
    assert "ExecStart=/opt/jobworker/bin/workerd --config /etc/jobworker/workerd.toml\n" in unit
