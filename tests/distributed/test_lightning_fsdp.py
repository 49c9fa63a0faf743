"""Lightning's ModelParallelStrategy (fully_shard) on 2 CPU processes with an emakit EMA: made by
hand in ``configure_model``, or by the ``emakit.integrations.lightning.EMA`` callback with a
distributed checkpoint and a resume (the script: ``lightning_fsdp.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("torch.distributed.fsdp")

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("lightning_fsdp.py")


def run(mode: str, tmp: Path, root: Path) -> list[dict]:
    out = tmp / mode
    done = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), str(root)],
                          capture_output=True, text=True, cwd=tmp, timeout=600)
    written = all(Path(f"{out}.{r}").is_file() for r in (0, 1))
    # gloo's threads can abort the interpreter after everything ran and was written ("terminate
    # called without an active exception", SIGABRT at exit; seen without emakit too): a crash
    # at teardown, not in the run, so the results still count
    teardown = done.returncode == -6 and written and \
        done.stderr.rstrip().endswith("terminate called without an active exception")
    assert done.returncode == 0 or teardown, done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]


def test_model_parallel_strategy_trains_and_validates_on_the_ema(tmp_path: Path) -> None:
    rows = run("manual", tmp_path, tmp_path / "root")
    for row in rows:
        # one update per optimizer step, local shards with the parameters' layout
        # 32 samples, batches of 8, split over 2 ranks: 2 optimizer steps per epoch
        assert row["step"] == row["num_updates"] == row["global_step"] == 2, row
        assert row["sharded"], row
        assert row["ema"] != row["raw"], row  # the validation under swapped() saw the average
    # each rank validates its own batches; the average they computed with is one
    assert rows[0]["average"] == rows[1]["average"]


def test_the_callback_checkpoints_and_resumes_a_sharded_ema(tmp_path: Path) -> None:
    root = tmp_path / "root"
    whole = run("callback", tmp_path, tmp_path / "unused")
    first = run("callback-first", tmp_path, root)
    assert list((root / "checkpoints").glob("*.ckpt")), "no distributed checkpoint written"
    resumed = run("callback-resume", tmp_path, root)
    for a, b, c in zip(whole, first, resumed):
        assert a["sharded"] and b["sharded"] and c["sharded"]
        assert (b["step"], b["num_updates"]) == (2, 2)
        assert (c["step"], c["num_updates"]) == (a["step"], a["num_updates"]) == (4, 4)
        assert c["ema"] == a["ema"], (a, c)  # the resumed EMA validates exactly as the whole run
        assert c["weights"] == a["weights"]  # the training weights resumed: every rank's shard
        assert c["average"] == a["average"]
