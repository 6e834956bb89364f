"""The access log of a real `pigeon serve`: one JSON line per REST request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, STACK

pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")


def test_rest_requests_are_logged_one_json_line_each(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pigeon.cli import main; main()",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        env={
            "PATH": "/usr/bin:/bin",
            "PIGEON_ARGON2_TIME_COST": "1",
            "PIGEON_ARGON2_MEMORY_KIB": "8",
            "PIGEON_WORKER": "3",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            msg = json.loads(line)["msg"]
            if msg.startswith("pigeon listening on "):
                url = "http://" + msg.split()[3]
                break
        assert url is not None
        body = json.dumps({"username": "logged", "password": PASSWORD}).encode()
        with urllib.request.urlopen(f"{url}/v1/users", body, timeout=10) as resp:
            assert resp.status == 201
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    access = [d for d in lines if d["logger"] == "pigeon.access"]
    assert len(access) == 1, rest
    (entry,) = access
    assert entry["msg"] == "POST /v1/users 201" and entry["status"] == 201
    assert entry["remote"] == "127.0.0.1" and entry["ms"] > 0 and entry["node"].endswith("/3")
