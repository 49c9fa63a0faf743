"""emakit.integrations.lightning.EMA in real Lightning runs on CPU.

Each run trains a small module (Linear + BatchNorm, whose ``num_batches_tracked`` is an integer
buffer) with gradient accumulation and checks the three points of the integration: the logged
validation metric is the metric of the EMA weights computed by hand; a run stopped at a
checkpoint and resumed ends bitwise where the uninterrupted run ends; the best checkpoint of a
``ModelCheckpoint`` monitoring the EMA metric holds the EMA weights and loads with Lightning's
own ``load_from_checkpoint``.
"""

import copy
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from launch import run_job

import emakit
from emakit.integrations.lightning import EMA, LAYOUT

DECAY = 0.8


class Module(pl.LightningModule):
    def __init__(self, lr: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                       torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), prog_bar=False)

    def test_step(self, batch, i):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch, i):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer(root, epochs, callbacks, **kw):
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), accumulate_grad_batches=2,
                      num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True, **kw)


def by_hand(module, weights, loader):
    """The validation loss of ``weights`` in a plain copy of the module, without Lightning."""
    twin = copy.deepcopy(module)
    twin.load_state_dict(weights)
    twin.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(twin(x), y) for x, y in loader]
    return torch.stack(losses).mean()


def test_validation_scores_the_ema_weights_and_integer_buffers_are_copied(tmp_path):
    module, callback = Module(), EMA(decay=DECAY)
    t = trainer(tmp_path, 2, [callback], enable_checkpointing=False)
    t.fit(module, data(), data(seed=2))
    ema = callback.ema
    assert ema.num_updates == t.global_step == 6  # 6 batches / 2 accumulated, 2 epochs
    assert ema.actions["net.1.num_batches_tracked"] == "copy"
    assert torch.equal(ema.averaged()["net.1.num_batches_tracked"],
                       module.net[1].num_batches_tracked)
    training = {k: v.clone() for k, v in module.state_dict().items()}
    expected = by_hand(module, ema.model_state_dict(), data(seed=2))
    assert t.callback_metrics["val_loss"] == expected  # the metric of the EMA weights
    assert by_hand(module, training, data(seed=2)) != expected
    # training weights back after validate / test / predict, which also run on the EMA
    [scores] = t.validate(module, data(seed=2), verbose=False)
    assert scores["val_loss"] == pytest.approx(float(expected), rel=0, abs=0)
    t.test(module, data(seed=2), verbose=False)
    predicted = torch.cat(t.predict(module, data(seed=2)))
    twin = copy.deepcopy(module)
    twin.load_state_dict(ema.model_state_dict())
    twin.eval()
    with torch.no_grad():
        assert torch.equal(predicted, torch.cat([twin(x) for x, _ in data(seed=2)]))
    assert all(torch.equal(v, training[k]) for k, v in module.state_dict().items())


def test_resume_from_checkpoint_equals_an_uninterrupted_run_bitwise(tmp_path):
    whole, whole_cb = Module(), EMA(decay=DECAY)
    trainer(tmp_path / "a", 3, [whole_cb], enable_checkpointing=False).fit(
        whole, data(), data(seed=2))

    first, first_cb = Module(), EMA(decay=DECAY)
    t = trainer(tmp_path / "b", 1, [first_cb], enable_checkpointing=False)
    t.fit(first, data(), data(seed=2))
    ckpt = tmp_path / "stop.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    state = saved["callbacks"]["emakit.EMA"]
    assert state["emakit"] == LAYOUT and state["ema"]["step"] == 3
    assert all(torch.equal(saved["current_model_state"][k], v)
               for k, v in first.state_dict().items())  # training weights kept aside

    resumed, resumed_cb = Module(), EMA(decay=DECAY)
    trainer(tmp_path / "c", 3, [resumed_cb], enable_checkpointing=False).fit(
        resumed, data(), data(seed=2), ckpt_path=ckpt)
    a, b = whole_cb.ema.state_dict(), resumed_cb.ema.state_dict()
    assert a["step"] == b["step"] == 9 and a["num_updates"] == b["num_updates"]
    assert all(torch.equal(a["shadows"][k], b["shadows"][k]) for k in a["shadows"])
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


class Recorder(pl.Callback):
    """The EMA weights and the logged metric at every validation."""

    def __init__(self, ema_callback):
        self.ema_callback, self.seen = ema_callback, []

    def on_validation_end(self, trainer, pl_module):
        weights = {k: v.clone() for k, v in self.ema_callback.ema.model_state_dict().items()}
        self.seen.append((float(trainer.callback_metrics["val_loss"]), weights))


def test_model_checkpoint_on_the_ema_metric_saves_the_ema_weights(tmp_path):
    module, callback = Module(lr=0.5), EMA(decay=DECAY)
    recorder = Recorder(callback)
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min",
                                        save_top_k=1)
    trainer(tmp_path, 4, [callback, recorder, best]).fit(module, data(), data(seed=2))
    loss, weights = min(recorder.seen, key=lambda s: s[0])
    assert best.best_model_score == pytest.approx(loss, rel=0, abs=0)
    loaded = Module.load_from_checkpoint(best.best_model_path)  # Lightning's own loader
    assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
    # and emakit reads its state back out of the .ckpt
    ckpt = torch.load(best.best_model_path, weights_only=True)
    again = emakit.EMA(Module(), decay=DECAY)
    again.load_state_dict(ckpt["callbacks"]["emakit.EMA"]["ema"])
    assert all(torch.equal(v, weights[k]) for k, v in again.model_state_dict().items())


def test_an_error_during_validation_puts_the_training_weights_back(tmp_path):
    class Failing(Module):
        fail = False

        def validation_step(self, batch, i):
            if self.fail:
                raise RuntimeError("boom")
            return super().validation_step(batch, i)

    module, callback = Failing(), EMA(decay=DECAY)
    t = trainer(tmp_path, 1, [callback], enable_checkpointing=False)
    t.fit(module, data(), data(seed=2))
    module.fail = True
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        t.validate(module, data(seed=2), verbose=False)
    assert not callback.ema.is_swapped
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_eval_on_training_keeps_the_training_weights_in_checkpoints(tmp_path):
    module, callback = Module(), EMA(decay=DECAY, eval_on="training")
    t = trainer(tmp_path, 1, [callback], enable_checkpointing=False)
    t.fit(module, data(), data(seed=2))
    assert t.callback_metrics["val_loss"] == by_hand(module, module.state_dict(), data(seed=2))
    t.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert "current_model_state" not in ckpt
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in module.state_dict().items())


def test_weights_only_checkpoints_are_named_in_a_warning(tmp_path):
    only = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(emakit.EMAWarning, match="save_weights_only=True"):
        trainer(tmp_path, 1, [EMA(decay=DECAY), only]).fit(Module(), data(), data(seed=2))


def test_bad_arguments_are_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="eval_on must be 'ema' or 'training', got 'raw'"):
        EMA(eval_on="raw")
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)
    with pytest.raises(TypeError, match=r"policy must be an emakit\.Policy"):
        EMA(policy={"buffers": "copy"})


def test_a_foreign_callback_state_under_our_key_is_refused():
    with pytest.raises(emakit.StateDictError, match="not an emakit EMA callback state"):
        EMA().load_state_dict({"latest_update_step": 3})


def test_resuming_from_lightnings_ema_weight_averaging_starts_from_its_average(tmp_path):
    from peers import write_lightning  # a real EMAWeightAveraging run, in a subprocess

    path = tmp_path / "lightning.ckpt"
    expected = write_lightning(path)

    class PeerModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            from peers import net
            self.net = net()

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the weights stay put

    class Probe(pl.Callback):  # runs after the EMA callback's on_train_start
        def on_train_start(self, trainer, pl_module):
            self.weights = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
            self.average = {k: v.clone() for k, v in callback.ema.averaged().items()}

    module, callback, probe = PeerModule(), EMA(decay=DECAY), Probe()
    gen = torch.Generator().manual_seed(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)),
        batch_size=16)
    ckpt = torch.load(path, weights_only=True)
    t = pl.Trainer(max_epochs=2, callbacks=[callback, probe], accelerator="cpu", logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path),
                   log_every_n_steps=1)
    # Lightning names the replaced callback (its own state is not needed: the average is
    # read from the checkpoint's state_dict)
    with pytest.warns(UserWarning, match=r"add the following callbacks: \['EMAWeightAveraging'\]"):
        t.fit(module, loader, ckpt_path=path)
    # training resumed from the training weights, the EMA from EMAWeightAveraging's average
    training = {k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items()}
    assert all(torch.equal(v, training[k]) for k, v in probe.weights.items())
    assert callback.ema.step == 6
    for name, want in expected.items():
        assert torch.equal(probe.average[f"net.{name}"].double(), torch.as_tensor(want).double())


DDP_SCRIPT = """
import sys, warnings, torch
import lightning.pytorch as pl
sys.path.insert(0, {here!r})
warnings.filterwarnings("ignore")
from test_lightning import Module, data
from emakit.integrations.lightning import EMA

callback = EMA(decay=0.8)
t = pl.Trainer(max_epochs=2, callbacks=[callback], accelerator="cpu", devices=2,
               strategy="ddp", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               default_root_dir={root!r}, num_sanity_val_steps=0)
module = Module()
t.fit(module, data(), data(seed=2))
t.save_checkpoint({ckpt!r})
shadows = callback.ema.state_dict()["shadows"]
torch.save({{"rank": t.global_rank, "step": t.global_step, "shadows": shadows,
            "weights": module.state_dict(), "val_loss": t.callback_metrics["val_loss"]}},
           {root!r} + f"/rank{{t.global_rank}}.pt")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # else gloo's threads may abort at exit
"""


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_keeps_one_identical_ema_per_rank(tmp_path):
    script = tmp_path / "ddp.py"
    ckpt = tmp_path / "ddp.ckpt"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        here=str(Path(__file__).parent), root=str(tmp_path), ckpt=str(ckpt))))
    proc = run_job([sys.executable, str(script)], timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6  # 48 samples / 2 ranks / 8 per batch, 2 epochs
    # the same average of the weights on both ranks; buffers (BatchNorm's statistics) are
    # copied from each rank's own model, whose buffers DDP makes equal only as a forward starts
    params = {f"net.{n}" for n, _ in Module().net.named_parameters()}
    assert params < set(r0["shadows"])
    assert all(torch.equal(r0["shadows"][k], r1["shadows"][k]) for k in params)
    saved = torch.load(ckpt, weights_only=True)
    ema = saved["callbacks"]["emakit.EMA"]["ema"]
    assert all(torch.equal(ema["shadows"][k], v) for k, v in r0["shadows"].items())
    assert all(torch.equal(saved["current_model_state"][k], v)
               for k, v in r0["weights"].items())
