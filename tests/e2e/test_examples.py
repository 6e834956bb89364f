"""The demos work as written: every file in examples/ runs against a real server, the README's
SDK example is examples/chat.py itself, and the README's shell walk-through, run line by line,
delivers every message it sends."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import STACK, Server

# The examples are clients of the protocol: the store behind the server does not matter.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()

#: What each example must print (a new example needs an entry here).
EXPECTED: dict[str, list[str]] = {
    "chat.py": [
        r"^alice_\w+ sent a text and a file to bob_\w+$",
        r"^bob_\w+ got: hello bob$",
        r"^bob_\w+ got note\.txt \('the plan'\), sha256 checked$",
    ],
}


async def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run a process group to its end; killed (with what it started) if it hangs: a message
    that is never delivered leaves a `listen --count` waiting."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "XDG_"))}
    return env | {"HOME": str(home), "PIGEON_LOG_JSON": "false"} | extra


def block(after: str, language: str) -> str:
    """The first fenced code block of `language` after the heading `after` in the README."""
    found = re.search(rf"{re.escape(after)}.*?```{language}\n(.*?)```", README, re.S)
    assert found, f"no {language} block after {after!r} in README.md"
    return found.group(1)


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.py")))
async def test_every_example_runs(server: Server, tmp_path: Path, example: str) -> None:
    assert example in EXPECTED, f"examples/{example}: say in EXPECTED what it must print"
    args = [sys.executable, str(REPO / "examples" / example), server.url]
    code, out, err = await run(args, tmp_path, clean_env(tmp_path))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(EXPECTED[example]), out
    for line, pattern in zip(lines, EXPECTED[example], strict=True):
        assert re.match(pattern, line), (line, pattern)


def test_the_readme_shows_examples_chat_as_it_is() -> None:
    assert block("## Using it", "python") == (REPO / "examples" / "chat.py").read_text()


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
async def test_the_readme_walkthrough_delivers_every_message(
    server: Server, tmp_path: Path
) -> None:
    script = block("## Using it", "sh")
    host = server.url.removeprefix("http://")
    script = script.replace("localhost:8080", host)
    script = script.replace(".venv/bin/pigeon", shlex.join([sys.executable, "-m", "pigeon.cli"]))
    env = clean_env(tmp_path, PIGEON_SERVER=server.url)
    code, out, err = await run(["bash", "-euc", script], tmp_path, env)
    assert code == 0, err
    assert "Traceback" not in err and "pigeon: error" not in err, err
    heard = [line for line in out.splitlines() if line.startswith("message ")]
    assert len(heard) == 2, out
    assert heard[0].endswith("#1 alice: hello")
    assert "#2 alice: the plan [attachment " in heard[1] and "note.txt" in heard[1]
