"""The command line as an operator meets it: every start-up failure is one line on stderr that
names its cause, with a non-zero exit, and no "listening" line or traceback before it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon
from tests.conftest import STACK

# The command line does not depend on the stack: once is enough.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")

_PIGEON = [sys.executable, "-c", "from pigeon.cli import main; main()"]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PIGEON_LOG_JSON": "false"}
    return subprocess.run(
        _PIGEON + args, env=base | (env or {}), capture_output=True, text=True, timeout=60
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "listening" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("pigeon: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_in_use_is_one_line(tmp_path: Path, taken_port: int) -> None:
    result = run(["serve", "--port", str(taken_port), "--data-dir", str(tmp_path)])
    line = one_error_line(result)
    assert f"cannot listen on 127.0.0.1:{taken_port}" in line and "in use" in line


def test_a_missing_database_is_named(tmp_path: Path) -> None:
    env = {
        "PIGEON_STORE__TYPE": "postgres",
        "PIGEON_STORE__DSN": "postgresql://postgres@127.0.0.1:5432/pigeon_no_such_db",
    }
    line = one_error_line(run(["serve", "--port", "0", "--data-dir", str(tmp_path)], env))
    assert "'pigeon_no_such_db' does not exist" in line


def test_bad_settings_and_files_exit_2(tmp_path: Path) -> None:
    cases = [
        (["serve", "--config", str(tmp_path / "absent.toml")], {}, "No such file"),
        (["serve"], {"PIGEON_LOG_LEVEL": "verbose"}, "log_level (PIGEON_LOG_LEVEL)"),
        (["serve"], {"PIGEON_LIMITS__GROUPCAP": "5"}, "limits.groupcap"),
        (["check-config"], {"PIGEON_PORT": "70000"}, "port (PIGEON_PORT)"),
    ]
    for args, env, expected in cases:
        result = run(args, env)
        assert result.returncode == 2
        assert expected in one_error_line(result)


def test_version_help_and_the_effective_settings() -> None:
    assert run(["--version"]).stdout.strip() == f"pigeon {pigeon.__version__}"
    usage = run(["serve", "-h"]).stdout
    assert "PIGEON_PORT" in usage and "8080" in usage
    shown = run(
        ["check-config"],
        {"PIGEON_REDIS__URL": "redis://:hunter2@cache:6379/0", "PIGEON_PORT": "9000"},
    )
    settings = json.loads(shown.stdout)
    assert settings["port"] == 9000 and settings["redis"]["url"] == "redis://:***@cache:6379/0"
    assert "hunter2" not in shown.stdout


def test_a_second_sigterm_during_shutdown_is_harmless(tmp_path: Path) -> None:
    """GNU `timeout` signals the process and its group: two SIGTERMs at once."""
    proc = subprocess.Popen(
        [*_PIGEON, "serve", "--port", "0", "--data-dir", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "PIGEON_LOG_JSON": "false"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at EOF if the server dies: the assert below then fails
            if "pigeon listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in rest, rest


def test_the_supervisor_gives_up_on_workers_that_cannot_start(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "PIGEON_STORE__TYPE": "postgres",
        "PIGEON_STORE__DSN": "postgresql://postgres@127.0.0.1:5432/pigeon_no_such_db",
        "PIGEON_BUS__TYPE": "redis",
        "PIGEON_PRESENCE__TYPE": "redis",
    }
    result = run(["serve", "--workers", "2", "--port", str(port), "--data-dir", str(tmp_path)], env)
    assert result.returncode == 1
    assert "giving up: workers exited 6 times" in result.stderr
    assert "'pigeon_no_such_db' does not exist" in result.stderr  # each worker said why
