"""The systemd unit in deploy/ is valid for systemd (when `systemd-analyze` is installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "deploy" / "systemd"


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")))
def test_the_unit_verifies(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the unit names the installed script; point it at this checkout's
    pigeon = Path(sys.executable).with_name("pigeon")
    text = (UNITS / unit).read_text().replace("/opt/pigeon/bin/pigeon", str(pigeon))
    (tmp_path / unit).write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in result.stderr.splitlines() if unit in line]
    assert result.returncode == 0 and not complaints, result.stderr
