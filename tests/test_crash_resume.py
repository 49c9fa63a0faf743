"""Exact resume under real crashes: SIGKILL a training subprocess, resume, compare bitwise.

The loop (tests/crash_train.py) trains a bf16 model with BatchNorm and an fp32-shadow EMA with a
warmup schedule and ``every=3``. It is killed at chosen moments -- mid-training, right after a
checkpoint, and while a checkpoint is being written -- and restarted each time from the last
complete checkpoint. One kill is made to land inside a write whatever the machine's load: the
loop stops at its first atomic rename of that save (``--pause-at``), the temporary written and
the old file still in place. The final model, optimizer and EMA state must be bitwise equal to those of
a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import emakit

SCRIPT = Path(__file__).parent / "crash_train.py"
STEPS = 40
# (line that triggers the kill, delay in seconds before SIGKILL); "mid-write N" pauses save N
KILLS = [("step 7", 0.0), ("save-begin 15", 0.0), ("mid-write 20", 0.0),
         ("save-end 25", 0.0), ("save-begin 30", 0.0), ("step 33", 0.0)]


def _start(folder: Path, mode: str, steps: int = STEPS,
           pause_at: int = -1) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(folder), "--steps", str(steps),
                             "--save-every", "5", "--mode", mode, "--pause-at", str(pause_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_to_end(folder: Path, mode: str) -> list[str]:
    with _start(folder, mode) as proc:
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return out.splitlines()


def _kill_at(folder: Path, mode: str, trigger: str, delay: float) -> bool:
    """Run until ``trigger`` is printed, SIGKILL; True if a write was cut (temporaries left)."""
    pause_at = int(trigger.split()[1]) if trigger.startswith("mid-write") else -1
    with _start(folder, mode, pause_at=pause_at) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        seen = []
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == trigger:
                if delay:
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (trigger, seen[-5:], proc.stderr.read())
    return any(p.name.endswith(".tmp") for p in folder.iterdir())


def _final(folder: Path) -> dict[str, object]:
    out: dict[str, object] = torch.load(folder / "final.pt", weights_only=True)
    return out


def _assert_bitwise(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["emakit", "torch"])
def test_sigkill_and_resume_is_bitwise_exact(mode: str, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    _run_to_end(clean, mode)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    cut_writes = 0
    for trigger, delay in KILLS:
        cut_writes += _kill_at(crashed, mode, trigger, delay)
    lines = _run_to_end(crashed, mode)
    assert lines[0] == "resumed 30"  # the last complete checkpoint before the final kill
    assert cut_writes >= 1, "no kill landed inside a checkpoint write; the test proved less"
    want, got = _final(clean), _final(crashed)
    _assert_bitwise(want, got)
    ema_state = got["ema"]
    assert isinstance(ema_state, dict)
    assert ema_state["step"] == STEPS and ema_state["last_update_step"] == 39
    assert ema_state["shadows"]["0.weight"].dtype == torch.float32
    assert ema_state["shadows"]["1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_whole_file(tmp_path: Path) -> None:
    """emakit.save over an existing file, killed at random moments: the file is always whole.

    The last run stops inside save 4 (temporary written, not yet renamed) and is killed there:
    the file must hold save 3, and the temporary is what a cut write leaves.
    """
    import random

    rng = random.Random(0)
    runs = [(f"save-begin {rng.randint(2, 6)}", rng.uniform(0.0, 0.01)) for _ in range(6)]
    for target, delay in [*runs, ("mid-write 4", 0.0)]:
        pause_at = int(target.split()[1]) if target.startswith("mid-write") else -1
        with _start(tmp_path, "overwrite", steps=10_000, pause_at=pause_at) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == target:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, target
        path = tmp_path / "big.safetensors"
        ema = emakit.EMA({"w": torch.zeros(2_000_000)}, decay=0.0)
        emakit.load(ema, path)  # never partial: loads, and holds one iteration's values
        w = ema.averaged()["w"]
        assert torch.equal(w, torch.full_like(w, float(w[0]))) and float(w[0]) >= 1, target
    assert float(w[0]) == 3.0  # the paused run: save 4 never replaced save 3
    cut = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert cut, "no kill landed inside a write; the test proved less"
