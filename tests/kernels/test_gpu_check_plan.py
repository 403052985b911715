"""scripts/gpu_check.sh --dry-run prints its stage plan and a budget that fits one device command."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_prints_the_plan_within_540_seconds(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert p.returncode == 0, p.stderr
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s", p.stdout, re.M)}
    stages = {k: v for k, v in rows.items() if k != "total"}
    assert list(stages) == ["setup", "tests", "bench", "memcheck", "racecheck"]
    assert rows["total"] == sum(stages.values()) < 540
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in p.stdout and "--quick" in p.stdout
    assert not (tmp_path / "out").exists()                    # a dry run runs and writes nothing
