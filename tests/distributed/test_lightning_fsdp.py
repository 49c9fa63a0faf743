"""Lightning's ModelParallelStrategy (fully_shard) on 2 CPU processes with an emakit EMA made in
``configure_model`` and attached in ``on_fit_start`` (the script: ``lightning_fsdp.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("torch.distributed.fsdp")

pytestmark = pytest.mark.slow


def test_model_parallel_strategy_trains_and_validates_on_the_ema(tmp_path: Path) -> None:
    script = Path(__file__).with_name("lightning_fsdp.py")
    out = tmp_path / "rank"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    for row in rows:
        # one update per optimizer step, local shards with the parameters' layout
        assert row["step"] == row["num_updates"] == row["global_step"] == 4, row
        assert row["sharded"], row
        assert row["ema"] != row["raw"], row  # the validation under swapped() saw the average
    assert rows[0]["ema"] == rows[1]["ema"]  # every rank computed with the same EMA weights
