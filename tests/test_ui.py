"""The Prefect UI on a served deployment: a finished run rendered by headless Chromium (issue 4).
Slow (a Prefect server, a serve process and a browser); skipped where Chromium is not installed."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_fixtures import build_setup, with_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_screenshot_of_a_served_run(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(with_output(build_setup(tmp_path / "setup"), tmp_path / "run")))
    out = tmp_path / "flow_run.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "ui_screenshot.sh"), str(cfg), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 30_000   # a rendered page, not blank
    assert (tmp_path / "run" / "results.json").is_file()
