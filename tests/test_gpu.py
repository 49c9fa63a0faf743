"""CUDA checks: run on a machine with a GPU (the device tool), skipped cleanly elsewhere."""

import warnings

import pytest

torch = pytest.importorskip("torch")

import emakit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_source(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "a": torch.randn(257, 33, device="cuda", generator=g),
        "b": torch.randn(1000, device="cuda", generator=g).bfloat16(),
        "c": torch.randn(8, 8, device="cuda", generator=g).double(),
        "n": torch.tensor(3, device="cuda"),
    }


def update_without_sync(ema):
    """ema.update(), failing if it synchronises the host with the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fast_path_equals_loop_on_cuda():
    src = cuda_source(0)
    fast, loop = emakit.EMA(src, decay=0.99), emakit.EMA(src, decay=0.99, foreach=False)
    for i in range(1, 10):
        for k, v in cuda_source(i).items():
            src[k].copy_(v)
        fast.update()
        loop.update()
    for k in src:
        assert torch.equal(fast.averaged()[k], loop.averaged()[k]), k


def test_update_does_not_synchronise_on_cuda():
    src = cuda_source(0)
    ema = emakit.EMA(src, decay=0.99)
    ema.update()  # first update builds the plan
    update_without_sync(ema)


def test_guarded_update_reads_back_one_value_per_update_on_cuda():
    """Policy(nonfinite="skip") reads the weights' peak back once per update (one sync), no more."""
    src = cuda_source(0)
    ema = emakit.EMA(src, decay=0.99, policy=emakit.Policy(nonfinite="skip"))
    ema.update()  # builds the plan and reads the shadows' bound once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                ema.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message).lower()]
    assert 1 <= len(syncs) <= 3, [str(w.message) for w in syncs]


@pytest.mark.parametrize("flat", [False, True])
def test_guard_on_cuda_skips_exactly_the_tensors_a_per_tensor_check_skips(flat):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Linear(32, 4)).cuda().bfloat16()
    if flat:
        emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.9, dtype=torch.float32,
                     policy=emakit.Policy(nonfinite="skip"))
    want = {k: v.clone() for k, v in ema.averaged().items()}
    skips = dict.fromkeys(want, 0)
    params = dict(model.named_parameters())
    for i in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
            bad = {2: float("nan"), 4: float("inf")}
            params["2.weight"][0, 0] = bad.get(i, 0.5)
        ema.update()
        for name, p in params.items():
            new = torch.lerp(want[name], p.detach().float(), 1.0 - 0.9)
            if bool(torch.isfinite(new).all()):
                want[name] = new
            else:
                skips[name] += 1
    for name in params:
        assert torch.equal(ema.averaged()[name], want[name]), name
    assert ema.nonfinite_skips()["2.weight"] == skips["2.weight"] == 2


def test_cpu_offloaded_shadow_of_cuda_model_swaps_and_restores_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16)).cuda()
    ema = emakit.EMA(model, decay=0.9, device="cpu")
    assert all(s.device.type == "cpu" for s in ema.averaged().values())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        assert torch.equal(model[0].weight.cpu(), ema.averaged()["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_flat_and_multi_on_cuda_equal_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.Linear(64, 8)).cuda()
    ref = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64),
                               torch.nn.Linear(64, 8)).cuda() for _ in range(2)]
    for r in ref:
        r.load_state_dict(model.state_dict())
    emakit.flatten_parameters(model)
    multi = emakit.MultiEMA(model, decays=(0.9, 0.99))
    loops = [emakit.EMA(r, decay=d, foreach=False) for r, d in zip(ref, (0.9, 0.99))]
    for i in range(5):
        with torch.no_grad():
            for m in (model, *ref):  # the same noise for the three models
                g = torch.Generator(device="cuda").manual_seed(i)
                for t in m.parameters():
                    t.add_(torch.randn(t.shape, device="cuda", generator=g))
        multi.update()
        for e in loops:
            e.update()
    assert multi.one_pass
    for got, want in zip(multi, loops):
        for k in got.names:
            assert torch.equal(got.averaged()[k], want.averaged()[k]), k


def test_offloaded_update_equals_the_loop_without_synchronising():
    """CUDA model, host shadows: pinned mirror, non-blocking copies, the fold on the worker."""
    src = cuda_source(0)
    ema = emakit.EMA(src, decay=0.9, device="cpu")
    loop = emakit.EMA(src, decay=0.9, device="cpu", foreach=False)
    ema.update()
    loop.update()
    groups = ema.update_plan()
    assert groups and all(g.kind == "offloaded" and g.pinned for g in groups)
    for i in range(1, 6):
        for k, v in cuda_source(i).items():
            src[k].copy_(v)
        update_without_sync(ema)
        loop.update()
        # the next "optimizer step" overwrites the weights right away, on the same stream
        for v in src.values():
            v.mul_(3)
    for k in src:
        assert torch.equal(ema.averaged()[k], loop.averaged()[k]), k


def test_offloaded_flat_model_and_swap_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).cuda()
    ref.load_state_dict(model.state_dict())
    model.bfloat16()
    ref.bfloat16()
    emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.9, device="cpu")
    loop = emakit.EMA(ref, decay=0.9, device="cpu", foreach=False)
    for i in range(4):
        x = torch.randn(32, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i))
        for m in (model, ref):
            m(x.bfloat16())  # BatchNorm buffers move
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01 * (i + 1))
        ema.update()
        loop.update()
    assert ema.update_plan()[0].runs == 1
    for k in loop.names:
        assert torch.equal(ema.averaged()[k], loop.averaged()[k]), k
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        assert torch.equal(model[0].weight.float().cpu(),
                           ema.averaged()["0.weight"].bfloat16().float())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_offload_overlap_on_a_side_stream_equals_the_loop():
    """attach(overlap=True): the copy runs on a side stream; the next step waits for it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256)).cuda().bfloat16()
    ref = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                              torch.nn.Linear(256, 256)).cuda().bfloat16()
    ref.load_state_dict(model.state_dict())
    emakit.flatten_parameters(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref)]
    ema = emakit.EMA(model, decay=0.9, device="cpu")
    loop = emakit.EMA(ref, decay=0.9, device="cpu", foreach=False)
    attachment = ema.attach(opts[0], overlap=True)
    loop.attach(opts[1])
    x = torch.randn(512, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    for _ in range(6):
        for m, opt in zip((model, ref), opts):
            m(x.bfloat16()).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert ema.update_plan()[0].side_stream
    for k in loop.names:
        assert torch.equal(ema.averaged()[k], loop.averaged()[k]), k
    attachment.remove()
