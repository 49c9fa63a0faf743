"""The update benchmark: its timing harness, its contenders, and emakit's zero-allocation update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emakit.bench import contenders, models, timing, worker
from emakit.cli import main


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
    rows = worker.run({"model": "tiny-gpt", "contenders": ["emakit", "seed snippet"],
                       "chunks": 3, "chunk_s": 0.005})
    by = {r["contender"]: r for r in rows}
    assert by["emakit"]["transient_mb"] == 0.0  # the update allocates nothing
    params = by["emakit"]["params"]
    # the seed snippet makes four temporaries per parameter per update: 16 bytes / parameter
    assert by["seed snippet"]["transient_mb"] * 1e6 >= 12 * params
    for r in rows:
        assert r["x_flat"] > 0.1 and r["update_ms"] > 0 and r["chunks_kept"] >= 1


def test_interleaved_reports_a_ratio() -> None:
    a, b = torch.zeros(10_000), torch.ones(10_000)
    r = timing.interleaved(lambda: (a.lerp_(b, 0.1), a.lerp_(b, 0.1)),
                           lambda: a.lerp_(b, 0.1), chunks=5, chunk_s=0.005)
    assert 1.2 < r.x_flat < 4.0  # two passes against one


def test_bench_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "vgg", "--out", str(tmp_path)]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err
    assert main(["bench", "--contenders", "mine", "--out", str(tmp_path)]) == 2
    assert "unknown contender 'mine'" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "absent")]) == 2


@pytest.mark.slow
def test_bench_cli_writes_results(tmp_path: Path) -> None:
    assert main(["bench", "--quick", "--models", "tiny-gpt", "--contenders", "emakit",
                 "timm ModelEmaV3", "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("update-peers-cpu-*threads-torch*.*.*-quick.md")).read_text()
    assert "| tiny-gpt | 1.1M / 100 | float32 | emakit |" in md


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
