"""The offloaded update (CUDA model, host shadows) on its host side: worker thread and settling.

On a CPU-only machine there is no CUDA model, so these tests route CPU groups through the
offloaded part (``_offloads`` patched to say yes): the mirror is then plain host memory and the
copy into it is complete when it returns, but the worker thread, the mirror, the host part and
every place where the engine settles pending work are the real ones. The CUDA side (pinned
mirror, non-blocking copies, the event) is covered by ``tests/test_gpu.py``.
"""

import threading

import pytest

torch = pytest.importorskip("torch")

import emakit
from emakit.backends.torch import offload as torch_offload
from emakit.backends.torch import parts as torch_parts


@pytest.fixture
def offloaded(monkeypatch):
    monkeypatch.setattr(torch_offload, "offloads", lambda source, shadow: True)


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 3))
    return model.to(dtype)


def perturb(models, i):
    """The same noise for every model's floating tensors; +1 for the integer ones."""
    g = torch.Generator().manual_seed(i)
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for name, first in states[0].items():
            if first.is_floating_point():
                noise = torch.randn(first.shape, generator=g).to(first.dtype)
            else:
                noise = torch.ones_like(first)
            for s in states:
                s[name].add_(noise)


class Gate:
    """Holds the worker thread until opened: offloaded work queues up behind it."""

    def __init__(self):
        self.event = threading.Event()
        torch_offload.worker().submit(self.event.wait, 10)

    def open_later(self, seconds=0.05):
        threading.Timer(seconds, self.event.set).start()


def part_kinds(ema):
    return {g.kind for g in ema.update_plan()}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_update_equals_the_loop(offloaded, flat, dtype):
    model, ref = make_model(dtype), make_model(dtype)
    if flat:
        emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.9, every=2)
    loop = emakit.EMA(ref, decay=0.9, every=2, foreach=False)
    for i in range(7):
        perturb([model, ref], i)
        ema.update()
        loop.update()
    assert part_kinds(ema) == {"offloaded"}
    for name in loop.names:
        assert torch.equal(ema.averaged()[name], loop.averaged()[name]), name
    if flat:  # one copy into the mirror and one host lerp for the whole flat buffer
        (lerp,) = [g for g in ema.update_plan() if g.role == "average"]
        assert (lerp.runs, lerp.loose) == (1, 0)


def test_the_update_reads_the_weights_of_its_step(offloaded):
    """Writes to the weights after update() (the next optimizer step) do not leak into it."""
    model, ref = make_model(), make_model()
    ema = emakit.EMA(model, decay=0.5)
    loop = emakit.EMA(ref, decay=0.5, foreach=False)
    gate = Gate()
    perturb([model, ref], 0)
    ema.update()
    loop.update()
    perturb([model], 1)  # while the host fold still waits behind the gate
    gate.open_later()
    for name in loop.names:
        assert torch.equal(ema.averaged()[name], loop.averaged()[name]), name


READS = {
    "shadows": lambda ema: ema.averaged(),
    "averaged": lambda ema: ema.averaged(),
    "model_state_dict": lambda ema: ema.model_state_dict(),
    "state_dict": lambda ema: ema.state_dict()["shadows"],
}


@pytest.mark.parametrize("read", list(READS))
def test_every_read_waits_for_the_pending_update(offloaded, read):
    model, ref = make_model(), make_model()
    ema = emakit.EMA(model, decay=0.5)
    loop = emakit.EMA(ref, decay=0.5, foreach=False)
    for i in range(2):
        gate = Gate()
        perturb([model, ref], i)
        ema.update()
        loop.update()
        gate.open_later()
        got, want = READS[read](ema), READS[read](loop)
        for name in loop.names:
            assert torch.equal(got[name], want[name]), (read, name)


def test_swap_and_copy_to_wait_for_the_pending_update(offloaded):
    model, ref = make_model(), make_model()
    ema = emakit.EMA(model, decay=0.5)
    loop = emakit.EMA(ref, decay=0.5, foreach=False)
    perturb([model, ref], 0)
    gate = Gate()
    ema.update()
    loop.update()
    gate.open_later()
    with ema.swapped(), loop.swapped():
        for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(got, want), name
    target, expected = make_model(seed=1), make_model(seed=1)
    gate = Gate()
    perturb([model, ref], 1)
    ema.update()
    loop.update()
    gate.open_later()
    ema.copy_to(target)
    loop.copy_to(expected)
    for (name, got), want in zip(target.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name


def test_writes_to_the_shadows_wait_for_the_pending_update(offloaded):
    """load_state_dict and register land after the pending fold, not under it."""
    model = make_model()
    ema = emakit.EMA(model, decay=0.5)
    saved = {k: v.clone() for k, v in ema.state_dict()["shadows"].items()}
    state = {**ema.state_dict(), "shadows": saved}
    perturb([model], 0)
    gate = Gate()
    ema.update()
    gate.open_later()
    ema.load_state_dict(state)
    for name in ema.names:
        assert torch.equal(ema.averaged()[name], saved[name]), name
    perturb([model], 1)
    gate = Gate()
    ema.update()
    gate.open_later()
    ema.register()
    for name, weight in model.state_dict().items():
        assert torch.equal(ema.averaged()[name], weight), name


def test_a_new_plan_waits_for_the_old_one(offloaded):
    model, ref = make_model(), make_model()
    ema = emakit.EMA(model, decay=0.5)
    loop = emakit.EMA(ref, decay=0.5, foreach=False)
    perturb([model, ref], 0)
    ema.update()
    loop.update()
    gate = Gate()
    perturb([model, ref], 1)
    ema.update()
    loop.update()
    old = ema.update_plan()
    for m in (model, ref):  # another dtype: the next update plans again
        m.double()
    gate.open_later()
    perturb([model, ref], 2)
    ema.update()
    loop.update()
    assert ema.update_plan() != old and "float64@cpu" in ema.update_plan()[0].source
    for name in loop.names:
        assert torch.equal(ema.averaged()[name], loop.averaged()[name]), name


def test_an_error_in_the_worker_is_raised_at_the_next_read(offloaded, monkeypatch):
    ema = emakit.EMA(make_model(), decay=0.5)
    ema.update()
    ema.averaged()  # that update's fold is done before lerp_ breaks

    def broken(self, sources, weight):
        raise RuntimeError("host fold failed")

    monkeypatch.setattr(torch_parts.Direct, "lerp_", broken)
    ema.update()  # returns: the error happens on the worker
    with pytest.raises(RuntimeError, match="host fold failed"):
        ema.averaged()


def test_multi_ema_offloaded_equals_its_loops(offloaded):
    model, refs = make_model(), [make_model(), make_model()]
    emakit.flatten_parameters(model)
    multi = emakit.MultiEMA(model, decays=(0.5, 0.9))
    loops = [emakit.EMA(r, decay=d, foreach=False) for r, d in zip(refs, (0.5, 0.9))]
    for i in range(4):
        perturb([model, *refs], i)
        multi.update()
        for e in loops:
            e.update()
    assert not multi.one_pass  # each plan copies its own
    for got, want in zip(multi, loops):
        for name in want.names:
            assert torch.equal(got.averaged()[name], want.averaged()[name]), name


def test_the_worker_is_one_thread_and_named():
    worker = torch_offload.worker()
    assert worker is torch_offload.worker()
    name = worker.submit(lambda: threading.current_thread().name).result()
    assert name.startswith("emakit-offload")


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_attach_with_overlap_fences_before_each_step_and_equals_the_loop(offloaded, monkeypatch):
    fenced = []
    real_fence = torch_offload.Offloaded.fence
    monkeypatch.setattr(torch_offload.Offloaded, "fence",
                        lambda self: (fenced.append(self), real_fence(self)))
    no_buffers = emakit.Policy(buffers="skip")
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ema = emakit.EMA(model, decay=0.9, policy=no_buffers)
    loop = emakit.EMA(ref, decay=0.9, policy=no_buffers, foreach=False)
    attachment = ema.attach(opt, overlap=True)
    ref_handle = loop.attach(ref_opt)
    train(model, opt, 5)
    train(ref, ref_opt, 5)
    assert ema.step == loop.step == 5
    assert len(fenced) == 4  # before steps 2..5: the update of the step before (one part)
    assert not ema.update_plan()[0].side_stream  # a side stream only for a CUDA model
    for name in loop.names:
        assert torch.equal(ema.averaged()[name], loop.averaged()[name]), name
    attachment.remove()
    attachment.remove()  # a second call does nothing
    ref_handle.remove()
    assert ema.attachment is None and not ema.overlap  # the next update plans without overlap
    train(model, opt, 1)
    assert ema.step == 5 and len(fenced) == 4


def test_attach_with_overlap_refuses_what_the_step_does_not_write_alone():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9)
    with pytest.raises(ValueError, match=r"3 may change otherwise: '1.running_mean', "
                                         r"'1.running_var', '1.num_batches_tracked'") as info:
        ema.attach(opt, overlap=True)
    assert "Policy(buffers='skip')" in str(info.value)
    assert ema.attachment is None
    head_only = torch.optim.SGD(model[2].parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9, policy=emakit.Policy(buffers="skip"))
    with pytest.raises(ValueError, match=r"4 may change otherwise: '0.weight', '0.bias', "
                                         r"'1.weight', '1.bias'"):
        ema.attach(head_only, overlap=True)
    for p in [*model[0].parameters(), *model[1].parameters()]:  # frozen: nothing writes them
        p.requires_grad_(False)
    ema.attach(head_only, overlap=True).remove()
