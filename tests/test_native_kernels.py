"""emakit's native CPU kernels give bitwise the results of torch's eager kernels.

The torch backend updates CPU groups with one call of its compiled kernels (``kernels.c``,
built on first use; ``EMAKIT_NATIVE`` chooses). Every test here runs the same training through
an EMA made with ``EMAKIT_NATIVE=1`` and one made with ``EMAKIT_NATIVE=0`` (torch's ``lerp_`` /
``_foreach_lerp_`` and the staged bf16 path) and asks for equal bits: plain updates, bf16 and
fp16 models into fp32 shadows, fp64, the non-finite guard (with a tensor large enough to be cut
between threads), several averages of one model, one and two threads. The build, the cache and
the fallback are tried in fresh processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emakit

torch = pytest.importorskip("torch")
nn = torch.nn

from emakit.backends.torch import native

SKIP = emakit.Policy(nonfinite="skip")
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and not os.environ.get("CC"),
    reason="no C compiler: the native kernels cannot be built here (torch's kernels are used)")


def model_of(sizes: list[int], dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Parameters of the given sizes (odd ones: tails of every vector width)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    for i, n in enumerate(sizes):
        m.register_parameter(f"p{i}", nn.Parameter(torch.randn(n, generator=g).to(dtype)))
    return m


def twins(monkeypatch, model, **options):
    """An EMA on the native kernels and one on torch's, each with its plan made."""
    made = {}
    for choice in ("1", "0"):
        monkeypatch.setenv("EMAKIT_NATIVE", choice)
        ema = emakit.EMA(model, **options)
        ema.update()  # the plan is made at the first update, under this choice
        made[choice] = ema
    monkeypatch.delenv("EMAKIT_NATIVE")
    return made["1"], made["0"]


def step(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def kinds(ema) -> set[str]:
    return {g.kind for g in ema.update_plan()}


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, k
        same = torch.equal(x, y) or (torch.isnan(x).equal(torch.isnan(y)) and torch.equal(
            torch.nan_to_num(x), torch.nan_to_num(y)))
        assert same, f"{k}: max diff {(x.double() - y.double()).abs().max().item()}"


def train_both(model, fast, eager, steps: int = 3) -> None:
    """A few training steps, each folded into both EMAs; then their averages must be equal."""
    for i in range(steps):
        step(model, seed=i)
        fast.update()
        eager.update()
    assert_same_bits(fast.averaged(), eager.averaged())


@needs_compiler
def test_the_kernels_build_here_and_say_so():
    assert native.kernels() is not None, native.status()
    assert native.status().startswith("native (")


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("flat", [False, True])
def test_updates_are_bitwise_torchs(monkeypatch, threads, dtype, flat):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model_of([1, 7, 33, 4096 + 5, 70_001, 131_075, 0, 3], dtype)
        if flat:
            emakit.flatten_parameters(model)
        shadow = torch.float64 if dtype == torch.float64 else torch.float32
        fast, eager = twins(monkeypatch, model, decay=0.9, dtype=shadow)
        assert kinds(fast) == {"native"}
        assert "native" not in kinds(eager)
        for i in range(4):
            step(model, seed=i)
            fast.update()
            eager.update()
        assert_same_bits(fast.averaged(), eager.averaged())
    finally:
        torch.set_num_threads(before)


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40_000), min_size=1, max_size=6),
       st.sampled_from([0.0, 1e-7, 0.001, 0.3, 0.5, 0.7, 0.999999, 1.0]),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_sizes_and_decays_are_bitwise_torchs(sizes, decay, dtype):
    model = model_of(sizes, dtype)
    made = []
    for choice in ("1", "0"):
        os.environ["EMAKIT_NATIVE"] = choice
        try:
            ema = emakit.EMA(model, decay=decay, dtype=torch.float32)
            ema.update()
        finally:
            del os.environ["EMAKIT_NATIVE"]
        made.append(ema)
    for i in range(3):
        step(model, seed=i)
        for ema in made:
            ema.update()
    assert_same_bits(made[0].averaged(), made[1].averaged())


@needs_compiler
def test_channels_last_weights_are_bitwise_torchs(monkeypatch):
    """Dense tensors in another memory order (a channels-last conv): shadow and weight share the
    strides, so one flat walk over both pairs the elements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)).to(
        memory_format=torch.channels_last).bfloat16()
    fast, eager = twins(monkeypatch, model, decay=0.7, dtype=torch.float32)
    assert kinds(fast) == {"native"}
    train_both(model, fast, eager, 3)


@needs_compiler
def test_buffers_are_copied_and_batchnorm_counters_kept(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    fast, eager = twins(monkeypatch, model, decay=0.8)
    for _ in range(3):
        model(torch.randn(16, 4))  # training mode: running stats and the counter move
        fast.update()
        eager.update()
    assert_same_bits(fast.averaged(), eager.averaged())
    assert fast.averaged()["1.num_batches_tracked"].item() == 3
    assert kinds(fast) == {"native"}


@needs_compiler
def test_several_averages_share_one_read_with_the_same_bits(monkeypatch):
    model = model_of([300, 70_001, 5], torch.bfloat16)
    made = {}
    for choice in ("1", "0"):
        monkeypatch.setenv("EMAKIT_NATIVE", choice)
        multi = emakit.MultiEMA(model, [0.9, 0.99], dtype=torch.float32)
        multi.update()
        made[choice] = multi
    monkeypatch.delenv("EMAKIT_NATIVE")
    assert made["1"].one_pass
    for i in range(3):
        step(model, seed=i)
        made["1"].update()
        made["0"].update()
    for fast, eager in zip(made["1"], made["0"]):
        assert_same_bits(fast.averaged(), eager.averaged())


@needs_compiler
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("where", [0, 65_000, 70_000, 139_999])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3e38, 1e38])
def test_the_guard_skips_the_same_tensors(monkeypatch, flat, where, value):
    """A 140,000-element tensor is cut between two threads (each checks its piece, then both
    agree): NaN or inf in either piece, or at the cut, skips the whole tensor; 1e38 is below
    the headroom and folded in by the kernel; -3e38 is above it (the kernel leaves the tensor)
    and the exact check that follows folds it in (its lerp is finite)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = model_of([3, 140_000, 70, 5])
        if flat:
            emakit.flatten_parameters(model)
        fast, eager = twins(monkeypatch, model, decay=0.5, policy=SKIP)
        for i in range(3):
            step(model, seed=i)
            if i == 1:
                with torch.no_grad():
                    model.p1.view(-1)[where] = value
                    model.p3[0] = float("nan")
            if i == 2:
                with torch.no_grad():
                    model.p1.zero_()
                    model.p3.zero_()
            fast.update()
            eager.update()
            assert fast.nonfinite_skips() == eager.nonfinite_skips(), i
            assert_same_bits(fast.averaged(), eager.averaged())
        skips = fast.nonfinite_skips()
        assert skips["p3"] == 1 and skips["p0"] == 0 and skips["p2"] == 0
        assert skips["p1"] == (0 if abs(value) < float("inf") else 1)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_a_moved_weight_is_noticed(monkeypatch):
    """Every tensor is held by address: rebinding one (``.data =``) makes a new plan."""
    model = model_of([10, 20])
    fast, eager = twins(monkeypatch, model, decay=0.5)
    old = fast.averaged()["p1"].clone()
    with torch.no_grad():
        model.p1.data = torch.full((20,), 4.0)  # new memory
    fast.update()
    eager.update()
    assert torch.equal(fast.averaged()["p1"], torch.lerp(old, torch.full((20,), 4.0), 0.5))
    assert_same_bits(fast.averaged(), eager.averaged())


@needs_compiler
def test_a_new_view_of_the_same_memory_is_noticed(monkeypatch):
    """``p.data = p.data[:2]`` keeps the address: the layout check (outside flattened runs)
    sees the new shape, and the update refuses it as torch's kernels do; a transposed square
    weight (same address and shape, other strides) is paired element by element again."""
    for choice in ("1", "0"):
        monkeypatch.setenv("EMAKIT_NATIVE", choice)
        lin = nn.Linear(4, 4)
        ema = emakit.EMA(lin, decay=0.5)
        ema.update()
        with torch.no_grad():
            lin.weight.data = lin.weight.data[:2]
        with pytest.raises(ValueError, match="has shape \\(2, 4\\) but its shadow has shape"):
            ema.update()
    model = model_of([16])
    with torch.no_grad():
        model.p0.data = model.p0.data.view(4, 4)
    fast, eager = twins(monkeypatch, model, decay=0.5)
    with torch.no_grad():
        model.p0.data = model.p0.data.t()
    train_both(model, fast, eager, 2)


@needs_compiler
def test_weights_replaced_by_to_are_freed_at_once(monkeypatch):
    """A plan keeps no reference to the memory of weights outside flattened runs (so that
    ``model.to(torch.bfloat16)`` frees the old fp32 weights at once): a weight's storage has as
    many users under an EMA on the native kernels as under one on torch's."""
    counts = {}
    for choice in ("1", "0"):
        monkeypatch.setenv("EMAKIT_NATIVE", choice)
        model = model_of([1000, 3000])
        ema = emakit.EMA(model, decay=0.5)
        ema.update()
        storage = model.p1.untyped_storage()
        counts[choice] = torch._C._storage_Use_Count(storage._cdata)
        del ema
    assert counts["1"] == counts["0"]


@needs_compiler
def test_one_strided_weight_leaves_the_rest_of_its_group_native(monkeypatch):
    model = model_of([100, 200])
    model.register_parameter("odd", nn.Parameter(torch.randn(8, 4)[:, ::2]))
    fast, eager = twins(monkeypatch, model, decay=0.6, policy=SKIP)
    assert sorted(g.kind for g in fast.update_plan()) == ["direct", "native"]
    train_both(model, fast, eager, 3)


def test_a_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv("EMAKIT_NATIVE", "yes")
    ema = emakit.EMA(model_of([4]), decay=0.5)
    with pytest.raises(ValueError, match=r"EMAKIT_NATIVE='yes'.*'auto'.*'0'.*'1'"):
        ema.update()


def test_eager_when_asked(monkeypatch):
    monkeypatch.setenv("EMAKIT_NATIVE", "0")
    ema = emakit.EMA(model_of([4, 5]), decay=0.5)
    ema.update()
    assert kinds(ema) == {"direct"}
    assert native.status() == "eager (EMAKIT_NATIVE=0)"


def run_fresh(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "EMAKIT_NATIVE"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=300, check=False)


PROBE = """
import torch, emakit
from emakit.backends.torch import native
m = torch.nn.Linear(3, 2)
e = emakit.EMA(m, decay=0.5)
e.update()
print(sorted({g.kind for g in e.update_plan()}), native.status())
"""


@needs_compiler
def test_built_once_then_loaded_from_the_cache_and_rebuilt_when_damaged(tmp_path: Path):
    env = {"EMAKIT_CACHE": str(tmp_path)}
    first = run_fresh(PROBE, env)
    assert first.returncode == 0, first.stderr
    assert "['native'] native (" in first.stdout
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".build-*"))
    stamp = built[0].stat().st_mtime_ns
    second = run_fresh(PROBE, env)
    assert second.returncode == 0 and "['native']" in second.stdout
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    assert built[0].stat().st_mode & 0o777 == 0o755  # a shared cache: others can load it
    whole = built[0].read_bytes()
    for damaged in (b"not a library", whole[:len(whole) // 2], whole[:-100]):
        built[0].write_bytes(damaged)  # a damaged cache file; cut short, it would crash dlopen's
        again = run_fresh(PROBE, env)  # caller (SIGBUS) when touched
        assert again.returncode == 0 and "['native']" in again.stdout, again.stderr
        assert built[0].read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_a_compiler_command_with_arguments(tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    done = run_fresh(PROBE, {"EMAKIT_CACHE": str(tmp_path), "CC": f"{cc} -Wall"})
    assert done.returncode == 0 and "['native'] native (" in done.stdout, done.stdout


@needs_compiler
def test_the_guard_runs_on_a_thread_with_a_small_stack(tmp_path: Path):
    """The guarded kernel keeps its per-thread results off a small caller's stack (it had put
    72 KiB there: a thread made with a 64 KiB stack crashed)."""
    code = """
import threading, torch, emakit
torch.set_num_threads(2)
model = torch.nn.Linear(256, 256)
ema = emakit.EMA(model, decay=0.9, policy=emakit.Policy(nonfinite="skip"))
ema.update()
def work():
    for _ in range(3):
        ema.update()
    print(sorted({g.kind for g in ema.update_plan()}), flush=True)
threading.stack_size(64 * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
"""
    done = run_fresh(code, {"EMAKIT_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "['native']" in done.stdout, (done.returncode, done.stderr)


def test_without_a_compiler_torchs_kernels_are_used_or_the_reason_given(tmp_path: Path):
    env = {"EMAKIT_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc")}
    auto = run_fresh(PROBE, env)
    assert auto.returncode == 0, auto.stderr
    assert "['direct'] eager (native kernels unavailable:" in auto.stdout
    strict = run_fresh(PROBE, {**env, "EMAKIT_NATIVE": "1"})
    assert strict.returncode != 0
    assert "EMAKIT_NATIVE=1, but emakit's native kernels are unavailable" in strict.stderr
    assert "EMAKIT_NATIVE=auto" in strict.stderr


def test_a_failed_build_says_why_and_warns_once(tmp_path: Path):
    """A compiler that is there but fails (no OpenMP, say): the reason is its error line, not
    its last one, and auto mode warns once (no compiler at all stays silent)."""
    fake = tmp_path / "cc-without-openmp"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake-cc 1.0; exit 0; }\n"
                    "echo 'kernels.c:28:10: fatal error: omp.h: No such file or directory' >&2\n"
                    "echo 'compilation terminated.' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"EMAKIT_CACHE": str(tmp_path / "cache"), "CC": str(fake)}
    auto = run_fresh(PROBE, env)
    assert auto.returncode == 0, auto.stderr
    assert "could not build kernels.c: kernels.c:28:10: fatal error: omp.h" in auto.stdout
    assert auto.stderr.count("EMAWarning: emakit's native CPU kernels are unavailable") == 1
    strict = run_fresh(PROBE, {**env, "EMAKIT_NATIVE": "1"})
    assert "omp.h: No such file or directory. Install a C compiler" in strict.stderr
    silent = run_fresh(PROBE, {"EMAKIT_CACHE": str(tmp_path / "c2"), "PATH": str(tmp_path),
                               "CC": ""})
    assert silent.returncode == 0 and "no C compiler found" in silent.stdout
    assert "EMAWarning" not in silent.stderr


def test_an_unwritable_cache_falls_back_with_the_reason(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    auto = run_fresh(PROBE, {"EMAKIT_CACHE": str(blocker / "cache")})
    assert auto.returncode == 0, auto.stderr
    assert "['direct'] eager (native kernels unavailable: cannot write the cache folder" \
        in auto.stdout
    assert "EMAKIT_CACHE" in auto.stdout
