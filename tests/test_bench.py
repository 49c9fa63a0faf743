"""The update benchmark: its timing harness, its contenders, and emakit's zero-allocation update."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from emakit.bench import contenders, models, timing, worker
from emakit.cli import main
from emakit.cli.bench import busy_summary


def test_models_have_the_documented_layouts() -> None:
    counts = {}
    for name in ("tiny-gpt", "resnet50"):
        m = models.build(name)
        counts[name] = (sum(p.numel() for p in m.parameters()), len(list(m.parameters())),
                        len(list(m.buffers())))
    assert counts == {"tiny-gpt": (1_059_584, 100, 0), "resnet50": (25_557_032, 161, 159)}
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build("vgg")


def test_no_contender_writes_into_the_model() -> None:
    """Each contender builds and runs on a small model, leaving the training weights alone."""
    for name, make in contenders.CONTENDERS.items():
        model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        try:
            update = make(model, 0.5)
        except ImportError:  # a peer that is not installed
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        update()
        with torch.no_grad():  # nothing of the contender's touched the model itself
            assert all(torch.equal(p, b + 1.0) for p, b in zip(model.parameters(), before)), name


def test_worker_rows_and_zero_transient_allocation() -> None:
    rows = worker.run({"model": "tiny-gpt", "contenders": ["emakit", "classic snippet"],
                       "chunks": 3, "chunk_s": 0.005})
    by = {r["contender"]: r for r in rows}
    assert by["emakit"]["transient_mb"] == 0.0  # the update allocates nothing
    params = by["emakit"]["params"]
    # the classic snippet makes four temporaries per parameter per update: 16 bytes / parameter
    assert by["classic snippet"]["transient_mb"] * 1e6 >= 12 * params
    for r in rows:  # no timing thresholds: a shared machine can be any amount slower
        assert r["x_flat"] > 0 and r["update_ms"] > 0 and r["chunks_kept"] >= 1
        assert r["chunks_discarded"] >= 0 and isinstance(r["quiet"], bool)
        assert r["others_cpus"] is None or r["others_cpus"] >= 0


class FakeMachine:
    """A simulated clock and CPU meter: each call costs fixed time units, and during the chunks
    listed in ``noisy`` (numbered in timing order, update and flat chunks alternating) another
    process keeps one CPU busy."""

    def __init__(self, noisy: set[int]) -> None:
        self.now, self.busy, self.reads, self.start, self.noisy = 0.0, 0.0, 0, 0.0, noisy

    def cost(self, units: float):
        def call() -> None:
            self.now += units

        return call

    def clock(self) -> float:
        return self.now

    def cpu(self) -> tuple[float, float]:
        k, self.reads = self.reads, self.reads + 1
        if k % 2 == 0:  # the reading before a chunk
            self.start = self.now
        elif k // 2 in self.noisy:
            self.busy += self.now - self.start
        return self.busy, 0.0  # (machine busy seconds, this process's seconds)


def _timed(machine: FakeMachine, **kw):
    # update: 3 units a call (7 calls a chunk), flat: 2 units a call (10 calls a chunk)
    return timing.interleaved(machine.cost(3.0), machine.cost(2.0), chunk_s=20.0,
                              clock=machine.clock, cpu=machine.cpu, **kw)


def test_interleaved_ratio_on_a_quiet_machine() -> None:
    r = _timed(FakeMachine(set()), chunks=3)
    assert (r.update_s, r.flat_s, r.x_flat) == (3.0, 2.0, 1.5)
    assert (r.kept, r.discarded, r.quiet, r.others_cpus) == (3, 0, True, 0.0)


def test_interleaved_discards_busy_chunks_and_reports_the_load() -> None:
    # chunk 0 (update of pair 0) and chunk 3 (flat of pair 1) are noisy: both pairs go
    r = _timed(FakeMachine({0, 3}), chunks=3)
    assert (r.x_flat, r.kept, r.discarded, r.quiet) == (1.5, 3, 2, True)
    assert r.others_cpus == pytest.approx((21 + 20) / (5 * 41))  # busy wall / all wall


def test_interleaved_on_a_machine_that_never_gets_quiet() -> None:
    r = _timed(FakeMachine(set(range(100))), chunks=3, max_tries=4)
    assert (r.kept, r.discarded, r.quiet, r.others_cpus) == (12, 12, False, 1.0)
    row = {"chunks_kept": r.kept, "chunks_discarded": r.discarded, "quiet": r.quiet,
           "others_cpus": r.others_cpus}
    assert busy_summary([row]) == (
        "machine BUSY: 12 of 12 chunk pairs noisy; 1 row(s) never got quiet and keep their "
        "noisy chunks; other processes: up to 1.00 CPUs. Rerun on an idle machine.")


def test_bench_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "vgg", "--out", str(tmp_path)]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err
    assert main(["bench", "--contenders", "mine", "--out", str(tmp_path)]) == 2
    assert "unknown contender 'mine'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["bench", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_cli_writes_results_outside_the_repo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out benchmarks/results does not exist here
    assert main(["bench", "--quick", "--models", "tiny-gpt", "--contenders", "emakit",
                 "timm ModelEmaV3"]) == 0
    out, err = capsys.readouterr()
    md = next((tmp_path / "benchmarks" / "results").glob(
        "update-peers-cpu-*threads-torch*.*.*-quick.md")).read_text()
    assert "| tiny-gpt | 1.1M / 100 | float32 | emakit |" in md
    assert "chunks kept / discarded, load |" in md
    assert re.search(r"machine (quiet|busy|BUSY): \d+ of \d+ chunk pairs noisy", md)
    assert re.search(r"machine (quiet|busy|BUSY): ", out)
    assert re.search(r"emakit: [\d.]+ ms, x flat [\d.]+; chunks kept / discarded \d+", err)


def test_offload_overlap_script_runs_and_writes_results(tmp_path: Path) -> None:
    """The GPU overlap benchmark, run on the CPU at toy size (nothing is offloaded here)."""
    import json
    import runpy

    script = Path(__file__).parent.parent / "benchmarks" / "offload_overlap.py"
    module = runpy.run_path(str(script))
    assert module["main"](["--device", "cpu", "--layers", "2", "--width", "16", "--tokens",
                           "8", "--steps", "2", "--every", "1", "3", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / f"offload-cpu-torch{torch.__version__.split('+')[0]}.json")
                      .read_text())["rows"]
    assert {(r["every"], r["contender"]) for r in rows} >= {
        (e, c) for e in (1, 3) for c in ("no EMA", "emakit, shadows in host memory")}
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_peer_agreement_script_runs_and_agrees_within_a_few_ulp(tmp_path: Path) -> None:
    """The long-run agreement benchmark, 20 updates (the table in the results is 200)."""
    import json
    import runpy

    script = Path(__file__).parent.parent / "benchmarks" / "peer_agreement.py"
    module = runpy.run_path(str(script))
    assert module["main"](["--steps", "20", "--out", str(tmp_path)]) == 0
    version = torch.__version__.split("+")[0]
    rows = json.loads((tmp_path / f"peer-agreement-cpu-torch{version}.json").read_text())
    assert {r["peer"].split(",")[0] for r in rows} >= {"torch-ema"}
    assert all(0.0 <= r["max"] < 8.0 for r in rows)  # bounded: a few ulp, not bitwise
    assert (tmp_path / f"peer-agreement-cpu-torch{version}.md").is_file()
