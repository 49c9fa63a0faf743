"""Sharded-training scenarios, run on every rank by ``ranks.run_scenarios`` (gloo, CPU).

Oracle: after every optimizer step each rank gathers the full parameters and buffers into a plain
dict and updates a single-process EMA of that trajectory (same options); the sharded EMA, gathered,
must equal it bitwise. Every rank trains on the same batch, so the model is the same everywhere.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import emakit


# --------------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, *, norm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    # 7 rows over 2 ranks: an uneven dim-0 shard (4 + 3); BatchNorm: plain buffers, an int one
    layers = collections.OrderedDict(fc1=nn.Linear(5, 7), act=nn.ReLU(), fc2=nn.Linear(7, 3))
    if norm:
        layers["bn"] = nn.BatchNorm1d(3)
    return nn.Sequential(layers)


def shard(model: nn.Module, **options: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc1, **options)
    fully_shard(model.fc2, **options)
    fully_shard(model, **options)
    return model


def full(x: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return (x.full_tensor() if isinstance(x, DTensor) else x).detach().clone()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state, gathered (a collective: every rank)."""
    return {n: full(v) for n, v in model.state_dict().items()}


def step(model: nn.Module, opt: Any, t: int) -> None:
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(8, 5, generator=g).to(next(model.parameters()).dtype)
    model.train()
    model(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


class Reference:
    """A single-process EMA of the gathered trajectory (the oracle)."""

    def __init__(self, model: nn.Module, **options: Any) -> None:
        self.weights = snapshot(model)
        self.ema = emakit.EMA(self.weights, **options)

    def update(self, model: nn.Module, **kw: Any) -> None:
        for name, value in snapshot(model).items():
            self.weights[name].copy_(value)
        self.ema.update(**kw)


def assert_same(ema: emakit.EMA, ref: emakit.EMA) -> None:
    got = {n: full(v) for n, v in ema.state_dict()["shadows"].items()}
    want = ref.state_dict()["shadows"]
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    assert (ema.step, ema.num_updates) == (ref.step, ref.num_updates)


def train(model: nn.Module, opt: Any, ema: Any, ref: Reference, steps: range) -> None:
    for t in steps:
        step(model, opt, t)
        ema.update()
        ref.update(model)


@contextlib.contextmanager
def count_collectives() -> Any:
    """Count the torch.distributed collectives called inside the block (c10d level)."""
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "barrier", "all_to_all", "all_to_all_single", "gather", "scatter",
             "reduce", "send", "recv", "isend", "irecv")
    calls: list[str] = []
    saved = {}
    c10d = dist.distributed_c10d
    for name in names:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def counted(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            calls.append(_name)
            return _fn(*a, **k)

        setattr(c10d, name, counted)
        setattr(dist, name, counted)
    try:
        from torch.distributed.tensor.debug import CommDebugMode

        with CommDebugMode() as mode:
            yield calls
        calls.extend(["dtensor"] * mode.get_total_counts())
    finally:
        for name, fn in saved.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)


# ------------------------------------------------------------------------------- scenarios
def update_is_local_and_bitwise(rank: int, world: int, tmp: Path) -> None:
    model = shard(make_model())
    assert type(model.fc1.weight).__name__ == "DTensor"
    ema = emakit.EMA(model, decay=0.9)
    ref = Reference(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, ema, ref, range(1, 4))
    step(model, opt, 4)
    with count_collectives() as calls:
        ema.update()
    ref.update(model)
    assert calls == [], calls
    with count_collectives() as control:  # the counter sees collectives, DTensor ones too
        dist.all_reduce(torch.ones(1))
        model.fc1.weight.full_tensor()
    assert control[0] == "all_reduce" and "dtensor" in control, control
    assert_same(ema, ref.ema)
    local = ema.update_plan()
    assert sum(g.tensors for g in local) == len(ema.names)
    # the shadows are local shards: the uneven dim-0 (7 rows) gives 4 + 3
    shadow = ema.state_dict()["shadows"]["fc1.weight"]
    assert tuple(shadow.shape) == (7, 5)
    assert shadow.to_local().shape[0] == (4, 3)[rank]


def options_schedules_every_and_multi(rank: int, world: int, tmp: Path) -> None:
    schedule = emakit.schedules.InverseGamma(power=0.75, max_decay=0.99)
    model = shard(make_model(1))
    ema = emakit.EMA(model, decay=schedule, every=2)
    multi = emakit.MultiEMA(model, decays=(0.5, 0.9))
    ref = Reference(model, decay=schedule, every=2)
    refs = [Reference(model, decay=d) for d in (0.5, 0.9)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(1, 6):
        step(model, opt, t)
        ema.update()
        multi.update()
        ref.update(model)
        for r in refs:
            r.update(model)
    assert_same(ema, ref.ema)
    for got, want in zip(multi, refs):
        assert_same(got, want.ema)


def bf16_mixed_precision_and_2d_mesh(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    # (no BatchNorm: its fp32 running statistics do not mix with bf16 compute)
    model = shard(make_model(2, norm=False), mesh=mesh, mp_policy=policy)
    placements = model.fc1.weight.placements
    assert [type(p).__name__ for p in placements] == ["Replicate", "Shard"], placements
    ema = emakit.EMA(model, decay=0.8)
    ref = Reference(model, decay=0.8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, ema, ref, range(1, 4))
    assert_same(ema, ref.ema)
    # a bf16 sharded model: fp32 shadows of bf16 local shards
    model16 = shard(make_model(3).bfloat16())
    ema16 = emakit.EMA(model16, decay=0.8)
    ref16 = Reference(model16, decay=0.8)
    opt16 = torch.optim.SGD(model16.parameters(), lr=0.1)
    train(model16, opt16, ema16, ref16, range(1, 3))
    assert ema16.state_dict()["shadows"]["fc1.weight"].dtype == torch.float32
    assert_same(ema16, ref16.ema)


def mixed_sharded_and_plain_and_flatten(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_model(4)
    fully_shard(model.fc1)  # only fc1 sharded: fc2 and the BatchNorm are plain on every rank
    layout = emakit.flatten_parameters(model)
    assert {"fc1.weight", "fc1.bias"} <= set(layout.skipped), layout.skipped
    ema = emakit.EMA(model, decay=0.7)
    ref = Reference(model, decay=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, ema, ref, range(1, 4))
    assert_same(ema, ref.ema)


def verbs_on_shards(rank: int, world: int, tmp: Path) -> None:
    model = shard(make_model(5))
    plain = make_model(5)  # the reference model, unsharded
    ema = emakit.EMA(model, decay=0.6)
    ref = Reference(model, decay=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, opt, ema, ref, range(1, 4))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    before = snapshot(model)
    # an eval forward leaves the root unsharded: swapped() reshards, then swaps the shards
    model.eval()
    with torch.no_grad():
        model(x)
    with ema.swapped(), torch.no_grad():
        got = model(x)
    plain.load_state_dict(ref.ema.model_state_dict())
    plain.eval()
    with torch.no_grad():
        want = plain(x)
    assert torch.equal(got, want), (got - want).abs().max()
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # training weights, bitwise
    # an exception inside the block: the weights come back all the same
    with contextlib.suppress(RuntimeError), ema.swapped():
        raise RuntimeError("inside")
    assert all(torch.equal(before[n], v) for n, v in snapshot(model).items())
    # apply_shadow/restore and store/restore
    ema.apply_shadow()
    ema.restore()
    ema.store()
    with torch.no_grad():
        model.fc1.weight.to_local().add_(1.0)
    ema.restore()
    assert all(torch.equal(before[n], v) for n, v in snapshot(model).items())
    # model_state_dict: DTensors laid out like the model's own state dict
    sd = ema.model_state_dict()
    assert type(sd["fc1.weight"]).__name__ == "DTensor"
    want_sd = ref.ema.model_state_dict()
    for name, value in sd.items():
        assert torch.equal(full(value), want_sd[name]), name
    # KeepBest: a collective; rank 0 writes one full file that loads into a plain model
    keep = emakit.KeepBest(ema, tmp / "best.safetensors")
    assert keep.observe(0.5)
    dist.barrier()
    from safetensors.torch import load_file

    best = make_model(9)
    best.load_state_dict(load_file(tmp / "best.safetensors"))
    for name, value in best.state_dict().items():
        assert torch.equal(value, want_sd[name]), name
    # copy_to(): the average written back as the training weights
    ema.copy_to()
    for name, value in snapshot(model).items():
        assert torch.equal(value, want_sd[name]), name


def files_and_distributed_checkpoints(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = shard(make_model(6))
    ema = emakit.EMA(model, decay=0.75)
    ref = Reference(model, decay=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, ema, ref, range(1, 4))
    # one full emakit file, gathered tensor by tensor, written by rank 0
    emakit.save(ema, tmp / "ema.safetensors")
    assert (tmp / "ema.safetensors").exists()  # every rank returns after the file is there
    if rank == 0:
        torch.save({"ref": ref.ema.state_dict(), "weights": snapshot(model)}, tmp / "ref.pt")
    else:
        snapshot(model)  # the same collectives on every rank
    dist.barrier()
    fresh = emakit.EMA(shard(make_model(6)), decay=0.75)
    emakit.load(fresh, tmp / "ema.safetensors")
    assert_same(fresh, ref.ema)
    again = emakit.EMA.from_checkpoint(shard(make_model(6)), tmp / "ema.safetensors")
    assert_same(again, ref.ema)
    # torch.distributed.checkpoint: the EMA is a Stateful
    dcp.save({"ema": ema}, checkpoint_id=str(tmp / "dcp"))
    loaded = emakit.EMA(shard(make_model(8)), decay=0.75)
    dcp.load({"ema": loaded}, checkpoint_id=str(tmp / "dcp"))
    assert_same(loaded, ref.ema)


def ddp_and_compiled_names(rank: int, world: int, tmp: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    inner = make_model(10)
    wrapped = DistributedDataParallel(inner)
    ema = emakit.EMA(wrapped, decay=0.5)
    assert "fc1.weight" in ema.names and not any(n.startswith("module.") for n in ema.names)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    step(wrapped, opt, 1)
    ema.update()
    plain = make_model(11)
    plain.load_state_dict(ema.model_state_dict())  # strict: the model's own names
    # a state saved from a wrapped model's names loads strictly into this one
    prefixed = ema.state_dict()
    prefixed["shadows"] = {f"module.{n}": v for n, v in prefixed["shadows"].items()}
    prefixed["actions"] = {f"module.{n}": a for n, a in prefixed["actions"].items()}
    other = emakit.EMA(make_model(10), decay=0.5)
    assert other.load_state_dict(prefixed) == emakit.LoadResult([], [], {})
    compiled = torch.compile(make_model(12))
    assert emakit.EMA(compiled).names == emakit.EMA(make_model(12)).names


def posthoc_recording_of_a_sharded_model(rank: int, world: int, tmp: Path) -> None:
    """Snapshots of an FSDP2 model: every rank records, rank 0 writes one set of files and one
    manifest; a resume from the state continues the same recording; synthesis in one process
    equals the synthesis from a single-process recording of the gathered trajectory."""
    from emakit.posthoc import Snapshots, synthesize

    model = shard(make_model(14))
    weights = snapshot(model)
    rec = Snapshots(model, tmp / "sharded", snapshot_every=2)
    ref = Snapshots(weights, tmp / f"plain-{rank}", snapshot_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def both(recording: Snapshots, steps: range) -> None:  # sharded, and the oracle
        for t in steps:
            step(model, opt, t)
            recording.update()
            for name, value in snapshot(model).items():
                weights[name].copy_(value)
            ref.update()

    both(rec, range(1, 5))
    saved = copy.deepcopy(rec.state_dict())  # the live shadows go on changing
    for t in range(5, 7):  # steps a resumed run will redo
        step(model, opt, t)
        rec.update()
        snapshot(model)
    dist.barrier()
    again = Snapshots(model, tmp / "sharded", snapshot_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropped 2 snapshot files after step 4"
        again.load_state_dict(saved)
    both(again, range(5, 9))
    dist.barrier()
    assert [(e.step, e.sigma_rel) for e in again.entries()] == \
        [(e.step, e.sigma_rel) for e in ref.entries()]
    assert sorted(p.name for p in (tmp / "sharded").iterdir()) == \
        sorted(p.name for p in (tmp / f"plain-{rank}").iterdir())
    from safetensors.torch import load_file

    for f in sorted((tmp / f"plain-{rank}").glob("*.safetensors")):
        got, want = load_file(tmp / "sharded" / f.name), load_file(f)
        assert got.keys() == want.keys(), f.name
        assert all(torch.equal(got[k], want[k]) for k in want), f.name
    for sigma_rel in (0.05, 0.07):  # a recorded width, and one between (8 steps: forced)
        got = synthesize(tmp / "sharded", sigma_rel=sigma_rel, max_profile_error=1.0)
        want = synthesize(tmp / f"plain-{rank}", sigma_rel=sigma_rel, max_profile_error=1.0)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(torch.as_tensor(got[name]), torch.as_tensor(want[name])), name
    # rank 0 reads the folder and finds another recording: every rank raises, none waits
    other = Snapshots(model, tmp / "sharded", snapshot_every=2)
    step(model, opt, 9)
    with pytest.raises(ValueError, match="another recording"):
        other.update()


def forward_after_swapped_uses_the_training_weights(rank: int, world: int, tmp: Path) -> None:
    """An eval forward inside swapped() leaves the root module unsharded with the EMA weights;
    the training forward after the block must gather the training weights again."""
    model, ref = shard(make_model(16)), make_model(16)  # BatchNorm: parameters of the root
    ema = emakit.EMA(model, decay=0.5)
    with torch.no_grad():
        for m in (model, ref):
            for p in m.parameters():
                p.add_(1.0)
    ema.update()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    with ema.swapped():
        model.eval()
        model(x)
    model.train()
    got, want = model(x), ref(x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got - want).abs().max()


def failed_saves_and_differing_metrics_raise_or_agree(rank: int, world: int, tmp: Path) -> None:
    """A save rank 0 cannot write raises on every rank (none is left in the gather); KeepBest
    with a metric that differs between ranks follows rank 0's, so the ranks save together."""
    model = shard(make_model(18))
    ema = emakit.EMA(model, decay=0.5)
    with pytest.raises(OSError, match="does not exist"):
        emakit.save(ema, tmp / "missing" / "ema.safetensors")
    with pytest.raises(OSError, match="does not exist"):
        emakit.io.write_weights(ema.model_state_dict(), tmp / "missing" / "w.pt")
    keep = emakit.KeepBest(ema, tmp / "best.safetensors", mode="min")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = {0: [1.0, 0.5, 0.7], 1: [1.0, 0.8, 0.6]}[rank]  # rank 0: the best is the 2nd
    saved = []
    for t, metric in enumerate(metrics, start=1):
        step(model, opt, t)
        ema.update()
        saved.append(keep.observe(metric))
    assert saved == [True, True, False], saved
    assert keep.best == 0.5 and keep.best_step == 2


TWO_RANKS = ["update_is_local_and_bitwise", "options_schedules_every_and_multi",
             "bf16_mixed_precision_and_2d_mesh", "mixed_sharded_and_plain_and_flatten",
             "verbs_on_shards", "files_and_distributed_checkpoints", "ddp_and_compiled_names",
             "posthoc_recording_of_a_sharded_model",
             "forward_after_swapped_uses_the_training_weights",
             "failed_saves_and_differing_metrics_raise_or_agree"]


# ------------------------------------------------------------------ one rank, after two
def load_on_another_world_size(rank: int, world: int, tmp: Path) -> None:
    """The 2-rank DCP checkpoint and full file, loaded on 1 rank: sharded and plain."""
    import torch.distributed.checkpoint as dcp

    source = tmp.parent / "files_and_distributed_checkpoints"
    ref = torch.load(source / "ref.pt", weights_only=True)
    want = emakit.EMA(make_model(6), decay=0.75)
    want.load_state_dict(ref["ref"])
    sharded = emakit.EMA(shard(make_model(8)), decay=0.75)
    dcp.load({"ema": sharded}, checkpoint_id=str(source / "dcp"))
    assert_same(sharded, want)
    plain = emakit.EMA(make_model(8), decay=0.75)  # a model that is not sharded at all
    dcp.load({"ema": plain}, checkpoint_id=str(source / "dcp"))
    assert_same(plain, want)
    from_file = emakit.EMA(shard(make_model(8)), decay=0.75)
    emakit.load(from_file, source / "ema.safetensors")
    assert_same(from_file, want)


ONE_RANK = ["load_on_another_world_size"]
