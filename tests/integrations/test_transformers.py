"""emakit.integrations.transformers.EMACallback in real Hugging Face Trainer runs on CPU.

A tiny BERT built from a config (no downloads) learns a toy classification with gradient
accumulation. The three points: the evaluation metric (during training and from a direct
``trainer.evaluate()``) is the metric of the EMA weights computed by hand; a run stopped at a
checkpoint and resumed from a copy of it outside ``output_dir`` ends bitwise where the
uninterrupted run ends; ``load_best_model_at_end`` loads the best checkpoint's EMA weights, and
the best / final EMA folders load with ``from_pretrained``.
"""

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launch import run_job

import emakit
from emakit.integrations.transformers import FILE_NAME, EMACallback

BertForSequenceClassification = transformers.BertForSequenceClassification


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the first token is in the upper half."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 30, (n, 8), generator=g)
        self.y = (self.x[:, 0] >= 15).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.y[i]}

    def batch(self):
        return {"input_ids": self.x, "attention_mask": torch.ones_like(self.x),
                "labels": self.y}


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def arguments(out, **kw):
    settings = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
                "gradient_accumulation_steps": 2, "max_steps": 6, "eval_strategy": "steps",
                "eval_steps": 3, "save_steps": 3, "logging_steps": 3, "report_to": [],
                "use_cpu": True, "learning_rate": 2e-2, "seed": 0, "disable_tqdm": True}
    settings.update(kw)
    return transformers.TrainingArguments(str(out), **settings)


def trainer_for(out, callbacks, **kw):
    return transformers.Trainer(tiny_bert(), arguments(out, **kw), train_dataset=Tokens(64, 1),
                                eval_dataset=Tokens(32, 2), callbacks=callbacks)


def loss_of(weights, data=None):
    """The evaluation loss of ``weights`` in a plain model, computed without the Trainer."""
    model = tiny_bert()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return model(**(data or Tokens(32, 2)).batch()).loss.item()


class Probe(transformers.TrainerCallback):
    """What the model held at each evaluation, and the metric the Trainer reported for it."""

    def __init__(self):
        self.seen = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.seen.append((state.global_step, metrics["eval_loss"], weights))


def test_evaluation_runs_on_the_ema_weights(tmp_path):
    callback, probe = EMACallback(decay=0.8, save_final=None), Probe()
    trainer = trainer_for(tmp_path, [callback, probe])
    assert callback.trainer is trainer
    trainer.train()
    ema = callback.ema
    assert ema.num_updates == trainer.state.global_step == 6  # 8 batches / 2 per step, 1.5 ep.
    assert [s for s, _, _ in probe.seen] == [3, 6]
    for _, metric, weights in probe.seen:  # the evaluations inside train()
        assert metric == loss_of(weights)
    average = ema.model_state_dict()
    assert all(torch.equal(probe.seen[-1][2][k], v) for k, v in average.items())
    training = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # a direct evaluate() / predict() also runs on the EMA, and puts the training weights back
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == loss_of(average) != loss_of(training)
    logits = trainer.predict(Tokens(32, 2)).predictions
    plain = tiny_bert()
    plain.load_state_dict(average)
    plain.eval()
    with torch.no_grad():
        expected = plain(**Tokens(32, 2).batch()).logits
    assert torch.equal(torch.as_tensor(logits), expected)
    assert all(torch.equal(v, training[k]) for k, v in trainer.model.state_dict().items())


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_a_checkpoint_outside_output_dir_is_bitwise(tmp_path):
    whole = EMACallback(decay=0.8, save_final=None)
    uninterrupted = trainer_for(tmp_path / "a", [whole])
    uninterrupted.train()

    first = EMACallback(decay=0.8, save_final=None)
    trainer_for(tmp_path / "b", [first, StopAt(3)]).train()
    saved = tmp_path / "b" / "checkpoint-3"
    assert emakit.read_state(saved / FILE_NAME)["step"] == 3
    moved = tmp_path / "elsewhere" / "ckpt"  # outside output_dir
    shutil.copytree(saved, moved)
    shutil.rmtree(tmp_path / "b")

    second = EMACallback(decay=0.8, save_final=None)
    resumed = trainer_for(tmp_path / "c", [second])
    resumed.train(resume_from_checkpoint=str(moved))
    a, b = whole.ema.state_dict(), second.ema.state_dict()
    assert (a["step"], a["num_updates"]) == (b["step"], b["num_updates"]) == (6, 6)
    assert all(torch.equal(a["shadows"][k], b["shadows"][k]) for k in a["shadows"])
    assert all(torch.equal(v, resumed.model.state_dict()[k])
               for k, v in uninterrupted.model.state_dict().items())


def test_a_checkpoint_without_the_ema_file_is_named_in_a_warning(tmp_path):
    trainer_for(tmp_path / "a", [StopAt(3)]).train()  # no EMACallback: no ema.safetensors
    callback = EMACallback(decay=0.8, save_final=None)
    with pytest.warns(emakit.EMAWarning, match="holds no ema.safetensors"):
        trainer_for(tmp_path / "b", [callback]).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert callback.ema.step == 6 and callback.ema.num_updates == 3


def test_best_checkpoint_loads_its_ema_weights_and_folders_load_with_from_pretrained(tmp_path):
    callback, probe = EMACallback(decay=0.8, save_best="best", save_final="final"), Probe()
    trainer = trainer_for(tmp_path, [callback, probe], load_best_model_at_end=True,
                          metric_for_best_model="loss", learning_rate=5e-2)
    trainer.train()
    best_step, best_loss, best_weights = min(probe.seen[:2], key=lambda s: s[1])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    # the model now holds the EMA weights of the best checkpoint, not its raw weights
    assert all(torch.equal(v, best_weights[k]) for k, v in trainer.model.state_dict().items())
    raw = BertForSequenceClassification.from_pretrained(trainer.state.best_model_checkpoint)
    assert not all(torch.equal(v, best_weights[k]) for k, v in raw.state_dict().items())
    # the best EMA model, in save_pretrained layout, by the Trainer's metric
    kept = BertForSequenceClassification.from_pretrained(tmp_path / "best")
    assert all(torch.equal(v, best_weights[k]) for k, v in kept.state_dict().items())
    assert callback.keep_best.best == best_loss and callback.keep_best.best_step == best_step
    # the final EMA model
    final = BertForSequenceClassification.from_pretrained(tmp_path / "final")
    average = callback.ema.model_state_dict()
    assert all(torch.equal(v, average[k]) for k, v in final.state_dict().items())


def test_bad_arguments_are_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="eval_on must be 'ema' or 'training'"):
        EMACallback(eval_on="both")
    with pytest.raises(ValueError, match="half_life"):
        EMACallback(decay=0.9, half_life=10)
    with pytest.raises(ValueError, match="save_best keeps the EMA model"):
        EMACallback(save_best="best", eval_on="training")
    with pytest.raises(TypeError, match="save_final must be a folder"):
        EMACallback(save_final=3)


def test_eval_on_training_and_binding_by_hand(tmp_path):
    callback = EMACallback(decay=0.8, eval_on="training", save_final=None)
    trainer = trainer_for(tmp_path, [])
    trainer.add_callback(callback)  # added later: on_init_end has passed, bind by hand
    callback.bind(trainer)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] == loss_of(trainer.model.state_dict())
    with pytest.raises(ValueError, match="already has an EMACallback bound"):
        EMACallback().bind(trainer)
    with pytest.raises(TypeError, match=r"must be a transformers\.Trainer"):
        EMACallback().bind(object())


DDP_SCRIPT = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {here!r})
from test_transformers import EMACallback, trainer_for
import torch.distributed as dist

callback = EMACallback(decay=0.8, save_final=None)
trainer = trainer_for({out!r}, [callback], ddp_backend="gloo", eval_strategy="no")
trainer.train()
rank = dist.get_rank()
torch.save({{"step": trainer.state.global_step, "world": dist.get_world_size(),
            "shadows": callback.ema.state_dict()["shadows"]}}, {out!r} + f"/rank{{rank}}.pt")
dist.barrier()
dist.destroy_process_group()  # else gloo's threads may abort the interpreter at exit
"""


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(here=str(Path(__file__).parent),
                                                        out=str(tmp_path))))
    proc = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(script)], timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r0["step"] == r1["step"] == 6
    assert all(torch.equal(r0["shadows"][k], r1["shadows"][k]) for k in r0["shadows"])
    # one file per checkpoint, written by the main process, holding the same EMA
    state = emakit.read_state(tmp_path / "checkpoint-6" / FILE_NAME)
    assert all(torch.equal(state["shadows"][k], v) for k, v in r0["shadows"].items())
