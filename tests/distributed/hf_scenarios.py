"""The Hugging Face callback on an FSDP2 model, 2 gloo ranks: every write is a collective.

accelerate runs FSDP only on accelerators (with ``use_cpu`` the Trainer falls back to DDP), so
the Trainer's loop is played here by hand: the callback gets the Trainer's events in the
Trainer's order for a tiny BERT sharded with ``fully_shard``, bound to a real ``Trainer`` (its
model and config are what the folders are written from). Oracle: a single-process EMA of the
gathered trajectory (``scenarios.Reference``). Before the fix, the main process gathered alone in
``on_save`` and the run hung.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "integrations"))

from scenarios import Reference, full

import emakit


def callback_writes_are_collectives(rank: int, world: int, tmp: Path) -> None:
    import transformers
    from test_transformers import Tokens, arguments, tiny_bert
    from torch.distributed.fsdp import fully_shard

    from emakit.integrations.transformers import FILE_NAME, EMACallback

    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    callback = EMACallback(decay=0.8, save_best="best", save_final="ema")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model, arguments(tmp, save_strategy="no", eval_strategy="no"),
                                       callbacks=[callback])
    assert callback.trainer is trainer
    args = SimpleNamespace(should_save=rank == 0, output_dir=str(tmp), metric_for_best_model=None,
                           greater_is_better=None, resume_from_checkpoint=None,
                           load_best_model_at_end=False)
    state = SimpleNamespace(global_step=0, best_model_checkpoint=None)
    callback.on_train_begin(args, state, None, model=model)
    ref = Reference(model, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = Tokens(16, 3).batch()
    losses = [3.0, 2.0, 2.5]  # the eval metric at steps 1, 2, 3: the best is step 2
    for t in (1, 2, 3):
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step = t
        callback.on_step_end(args, state, None)
        ref.update(model)
        if t == 2:
            ckpt = tmp / "checkpoint-2"
            if rank == 0:
                ckpt.mkdir()
            dist.barrier()
            callback.on_save(args, state, None)
            saved = {k: v.clone() for k, v in ref.ema.state_dict()["shadows"].items()}
            best = {k: full(v) for k, v in ref.ema.model_state_dict().items()}
        callback.on_evaluate(args, state, None, metrics={"eval_loss": losses[t - 1]})
    callback.on_train_end(args, state, None, model=model, processing_class=None)
    final = ref.ema.model_state_dict()
    dist.barrier()
    state_file = emakit.read_state(tmp / "checkpoint-2" / FILE_NAME)
    assert state_file["step"] == 2
    for name, value in saved.items():
        assert torch.equal(state_file["shadows"][name], value), name
    for folder, want in (("best", best), ("ema", final)):
        loaded = transformers.BertForSequenceClassification.from_pretrained(tmp / folder)
        got = loaded.state_dict()
        for name, value in want.items():
            assert torch.equal(got[name], value), (folder, name)


ALL = ["callback_writes_are_collectives"]
