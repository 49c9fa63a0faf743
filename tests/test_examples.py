import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_resumes_exactly():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, check=True)
    assert "resumed at step 512; shadows identical: True" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == 8
    assert float(rows[-1][2]) > float(rows[-1][1])  # the EMA beats the noisy raw weights
