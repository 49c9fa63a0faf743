"""The engine's safety rules: tied weights, one update per step, bias correction with skips,
overflow under the guard, non-finite write-backs, stall warnings, threads."""

import threading

import numpy as np
import pytest

import emakit
from emakit import schedules as S
from oracle import weighted_sum

torch = pytest.importorskip("torch")
nn = torch.nn


class Tied(nn.Module):
    """An embedding tied to the output head, as in most language models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


# ----------------------------------------------------------------------------- tied weights
def test_tied_weights_are_averaged_once_and_carry_the_average_under_every_name(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ema = emakit.EMA(model, decay=0.5)
    assert ema.names == ["emb.weight"]  # one shadow for the shared tensor
    start = model.emb.weight.detach().clone()
    with torch.no_grad():
        model.emb.weight += 1.0
    ema.update()
    expected = torch.lerp(start, start + 1.0, 0.5)
    state = ema.model_state_dict()
    assert set(state) == {"emb.weight", "head.weight"}
    for name in state:
        assert torch.equal(state[name], expected), name
    fresh = Tied()
    fresh.load_state_dict(state)  # strict: every name of the model is there
    assert torch.equal(fresh.emb.weight, expected) and torch.equal(fresh.head.weight, expected)
    assert ema.state_dict()["aliases"] == {"head.weight": "emb.weight"}
    keep = emakit.KeepBest(ema, tmp_path / "best.safetensors")
    keep.observe(1.0)
    from safetensors.torch import load_file

    best = Tied()
    best.load_state_dict(load_file(tmp_path / "best.safetensors"))
    assert torch.equal(best.head.weight, expected)


def test_the_same_array_under_two_names_is_one_entry():
    w = np.zeros(3)
    ema = emakit.EMA({"a": w, "b": w, "c": np.ones(2)}, decay=0.5)
    assert ema.names == ["a", "c"]
    w += 2.0
    ema.update()
    state = ema.model_state_dict()
    np.testing.assert_array_equal(state["a"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(state["b"], [1.0, 1.0, 1.0])


# -------------------------------------------------------------------- one update per step
def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model, opt):
    opt.zero_grad()
    model(torch.ones(4, 3)).square().sum().backward()
    opt.step()


def test_a_manual_update_of_an_attached_ema_is_refused():
    model, opt = _model_and_opt()
    ema = emakit.EMA(model, decay=0.9)
    attachment = ema.attach(opt)
    _step(model, opt)
    with pytest.raises(ValueError, match=r"attached to an optimizer.*count the step twice"):
        ema.update()
    assert ema.step == 1 and ema.num_updates == 1
    assert ema.update(step=1) is False  # the step the hook already averaged: a no-op
    assert ema.attachment is attachment and attachment.active
    attachment.remove()
    assert ema.attachment is None and not attachment.active
    assert ema.update() is True and ema.step == 2


def test_attaching_twice_is_refused():
    model, opt = _model_and_opt()
    ema = emakit.EMA(model, decay=0.9)
    ema.attach(opt)
    with pytest.raises(ValueError, match=r"attach\(\) called twice on the same optimizer"):
        ema.attach(opt)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"attached to another optimizer.*once after all"):
        ema.attach(other)
    _step(model, opt)
    assert ema.num_updates == 1


def test_attach_unwraps_an_accelerate_optimizer_and_counts_real_steps_only():
    accelerate = pytest.importorskip("accelerate")
    model, opt = _model_and_opt()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, opt)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    ema = emakit.EMA(model, decay=0.9)
    attachment = ema.attach(opt)
    assert attachment.optimizer is opt.optimizer
    for _ in range(6):  # 6 micro-batches, accumulated in pairs: 3 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(4, 3)).square().sum())
            opt.step()
            opt.zero_grad()
    assert ema.step == 3 and ema.num_updates == 3
    with pytest.raises(ValueError, match=r"attach\(\) called twice"):
        ema.attach(opt.optimizer)


def test_attach_refuses_what_has_no_hooks():
    model, _ = _model_and_opt()
    ema = emakit.EMA(model, decay=0.9)
    with pytest.raises(TypeError, match=r"needs a torch.optim.Optimizer.*got object"):
        ema.attach(object())


# ------------------------------------------------------------- init='zeros' corrections
def test_zeros_init_with_a_skipped_first_step_corrects_by_the_updates_that_went_in():
    w = {"w": np.ones(2)}
    ema = emakit.EMA(w, decay=0.9, start="zeros", policy=emakit.Policy(nonfinite="skip"))
    w["w"][:] = np.nan
    ema.update()
    assert ema.nonfinite_skips() == {"w": 1}
    with pytest.raises(emakit.SwapError, match=r"no average yet for 1 tensor\(s\): 'w'"):
        ema.averaged()
    w["w"][:] = 1.0
    for _ in range(12):
        ema.update()
        np.testing.assert_allclose(ema.averaged()["w"], 1.0, rtol=1e-12)  # a fixed point
    w["w"][:] = np.inf  # a later skip changes nothing either
    ema.update()
    np.testing.assert_allclose(ema.averaged()["w"], 1.0, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_zeros_init_with_skips_matches_the_weighted_sum_of_the_updates_kept(backend):
    rng = np.random.default_rng(3)
    values = [rng.normal(size=4) for _ in range(20)]
    skipped = {0, 3, 4, 11}
    arr = np.zeros(4) if backend == "numpy" else torch.zeros(4, dtype=torch.float64)
    ema = emakit.EMA({"w": arr}, decay=0.8, start="zeros", policy=emakit.Policy(nonfinite="skip"))
    kept = []
    for t, v in enumerate(values):
        arr[:] = np.nan if t in skipped else (v if backend == "numpy" else torch.from_numpy(v))
        ema.update()
        if t not in skipped:
            kept.append(v)
    # zero-started average of the kept updates, corrected: sum_j (1-d) d^(n-j) v_j / (1 - d^n)
    n = len(kept)
    expected = sum(0.2 * 0.8 ** (n - 1 - j) * v for j, v in enumerate(kept)) / (1 - 0.8 ** n)
    got = np.asarray(ema.averaged()["w"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    state = ema.state_dict()
    assert state["decay_products"]["w"] == pytest.approx(0.8 ** n, rel=1e-12)
    again = emakit.EMA({"w": arr}, decay=0.8, start="zeros", policy=emakit.Policy(nonfinite="skip"))
    again.load_state_dict(state)
    np.testing.assert_array_equal(np.asarray(again.averaged()["w"]), got)
    unguarded = emakit.EMA({"w": arr}, decay=0.8, start="zeros")
    with pytest.raises(emakit.StateDictError, match=r"Policy\(nonfinite=.skip.\) to load it"):
        unguarded.load_state_dict(state)


def test_zero_start_with_decay_one_is_refused():
    with pytest.raises(ValueError, match=r"start='zeros' with decay=1 never averages"):
        emakit.EMA({"w": np.ones(2)}, decay=1.0, start="zeros")
    frozen = S.InverseGamma(min_decay=1.0, max_decay=1.0, update_after_step=3)
    ema = emakit.EMA({"w": np.ones(2)}, decay=frozen, start="zeros")  # decay 0 for 4 steps
    ema.update(step=1)
    np.testing.assert_array_equal(ema.averaged()["w"], [1.0, 1.0])
    ema2 = emakit.EMA({"w": np.ones(2)}, decay=S.Constant(1.0))
    ema2.update()
    np.testing.assert_array_equal(ema2.averaged()["w"], [1.0, 1.0])  # copy-init freezes


# -------------------------------------------------------------- the guard and overflow
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_guard_skips_values_that_overflow_the_shadow_or_the_lerp(backend):
    def arr(values, dtype):
        a = np.array(values, dtype=dtype)
        return a if backend == "numpy" else torch.from_numpy(a)

    wide = {"w": arr([1.0, 2.0], np.float64)}
    ema = emakit.EMA(wide, decay=0.5, dtype="float32", policy=emakit.Policy(nonfinite="skip"))
    wide["w"][0] = 1e300  # finite in float64, inf in the float32 shadow
    ema.update()
    assert ema.nonfinite_skips() == {"w": 1}
    np.testing.assert_array_equal(np.asarray(ema.averaged()["w"]), [1.0, 2.0])
    big = {"w": arr([3e38, -3e38], np.float32)}
    ema = emakit.EMA(big, decay=0.5, policy=emakit.Policy(nonfinite="skip"))
    big["w"][:] = arr([-3e38, 3e38], np.float32)  # finite, but lerp's (end - start) overflows
    ema.update()
    assert ema.nonfinite_skips() == {"w": 1}
    np.testing.assert_array_equal(np.asarray(ema.averaged()["w"]),
                                  np.array([3e38, -3e38], np.float32))


@pytest.mark.parametrize("spec", [np.float32, np.dtype("float32"), "float32"])
def test_dtype_accepts_the_numpy_type_object(spec):
    ema = emakit.EMA({"w": np.ones(2)}, dtype=spec)
    assert ema.averaged()["w"].dtype == np.float32
    t = emakit.EMA({"w": torch.ones(2, dtype=torch.float64)}, dtype=spec)
    assert t.averaged()["w"].dtype == torch.float32


# -------------------------------------------------------------- non-finite write-back
def test_copy_to_refuses_a_non_finite_average_and_changes_nothing():
    w = {"w": np.ones(3), "v": np.ones(2)}
    ema = emakit.EMA(w, decay=0.5)
    w["w"][1] = np.nan
    ema.update()
    w["w"][:] = 5.0
    with pytest.raises(ValueError, match=r"average of 1 tensor\(s\) holds NaN or Inf \('w'\)"):
        ema.copy_to()
    np.testing.assert_array_equal(w["w"], [5.0, 5.0, 5.0])
    target = {"w": np.zeros(3), "v": np.zeros(2)}
    with pytest.raises(ValueError, match=r"holds NaN or Inf"):
        ema.copy_to(target)
    np.testing.assert_array_equal(target["v"], [0.0, 0.0])


# --------------------------------------------------------------------------- stall warning
@pytest.mark.parametrize(("dtype", "decay", "warns"), [
    ("bfloat16", 0.99, True), ("float16", 0.999, True), ("bfloat16", 0.5, False),
    ("float16", 0.9, False)])
def test_stall_warning_follows_the_resolution_bound(dtype, decay, warns):
    # the bound: a change below u/(1-d) of the shadow is rounded away; warn above 1%
    w = {"w": torch.full((4,), 1.0)}
    if warns:
        with pytest.warns(emakit.EMAWarning, match=rf"{dtype} shadow with decay {decay:g} stalls"):
            ema = emakit.EMA(w, decay=decay, dtype=dtype)
    else:
        ema = emakit.EMA(w, decay=decay, dtype=dtype)
    w["w"].fill_(1.3)
    for _ in range(1000):
        ema.update()
    moved = float(ema.averaged()["w"][0]) != 1.0
    assert moved != warns  # a warned shadow is stuck at its start; the others moved


# ---------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_threads_sharing_an_ema_take_turns(backend):
    arr = np.arange(4096.0) if backend == "numpy" else torch.arange(4096.0)
    ema = emakit.EMA({"w": arr}, decay=0.99, start="zeros")
    ref = emakit.EMA({"w": arr}, decay=0.99, start="zeros")
    snapshots = []

    def train():
        for _ in range(300):
            ema.update()

    def watch():
        for _ in range(200):
            with ema.lock:
                state = ema.state_dict()
                snapshots.append((state["step"], state["num_updates"], state["decay_product"]))

    threads = [threading.Thread(target=train) for _ in range(2)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ema.step == ema.num_updates == 600
    for _ in range(600):
        ref.update()
    np.testing.assert_array_equal(np.asarray(ema.averaged()["w"]), np.asarray(ref.averaged()["w"]))
    for step, updates, product in snapshots:  # never torn: counters belong together
        assert step == updates and product == pytest.approx(0.99 ** step, rel=1e-9)


def test_weighted_sum_oracle_still_describes_the_guarded_copy_init():
    xs = [np.full(2, float(k)) for k in range(6)]
    w = {"w": xs[0].copy()}
    ema = emakit.EMA(w, decay=0.7, policy=emakit.Policy(nonfinite="skip"))
    for x in xs[1:]:
        w["w"][:] = x
        ema.update()
    expected = weighted_sum(xs[0], list(enumerate(xs[1:], 1)), lambda t: 0.7)
    np.testing.assert_allclose(ema.averaged()["w"], expected, rtol=1e-12)


def test_store_and_restore_take_torch_emas_parameters_argument():
    model, _ = _model_and_opt()
    ema = emakit.EMA(model, decay=0.5)
    before = model.weight.detach().clone()
    ema.store(model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.restore(model.parameters())
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match=r"store\(parameters\): 1 of the 1 tensors given are not"):
        ema.store([torch.zeros(2)])


# ----------------------------------------------------------------------------- wrappers
def test_unsupported_sharding_wrappers_are_refused_by_name():
    """FSDP1 and DeepSpeed ZeRO-3 hide the full parameters: refused, saying what works."""

    class FullyShardedDataParallel(nn.Module):  # what FSDP1's wrapper is called
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match=r"FSDP1.*fully_shard"):
        emakit.EMA(FullyShardedDataParallel(nn.Linear(2, 2)))
    partitioned = nn.Linear(2, 2)
    partitioned.weight.ds_id = 0  # what ZeRO-3 sets on each partitioned parameter
    with pytest.raises(ValueError, match=r"'weight'.*ZeRO stage 3"):
        emakit.EMA(partitioned)


def test_a_deepspeed_engine_is_unwrapped_like_ddp():
    class DeepSpeedEngine(nn.Module):  # ZeRO 1/2: full parameters under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = nn.Linear(2, 2)
    ema = emakit.EMA(DeepSpeedEngine(inner))
    assert sorted(ema.averaged()) == ["bias", "weight"]
