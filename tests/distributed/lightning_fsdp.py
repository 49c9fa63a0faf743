"""Lightning's ModelParallelStrategy with ``fully_shard`` on 2 CPU processes and an emakit EMA.

Run as a script (Lightning starts the second process by running it again):

    python lightning_fsdp.py MODE OUT ROOT

``MODE``: ``manual`` (the EMA made in ``configure_model`` after sharding, attached in
``on_fit_start``, validation under ``swapped()``), or the ``emakit.integrations.lightning.EMA``
callback: ``callback`` (2 epochs), ``callback-first`` (1 epoch, checkpointed in ``ROOT``) and
``callback-resume`` (from that checkpoint to 2 epochs). Each rank writes one JSON line to
``OUT.RANK``: the EMA's step and updates, whether its shadows are DTensors, the validation losses.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


def main(mode: str, out: str, root: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    import emakit
    from emakit.integrations import lightning as ema_lightning

    manual = mode == "manual"

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
            self.ema: emakit.EMA | None = None
            self.losses: dict[str, float] = {}

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
            if manual:
                self.ema = emakit.EMA(self.net, decay=0.8)  # after sharding: local shadows

        def on_fit_start(self) -> None:
            if self.ema is not None:
                self.ema.attach(self.trainer.optimizers[0])

        def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
            return self.net(batch).square().mean()

        def validation_step(self, batch: torch.Tensor, _: int) -> None:
            loss = self.net(batch).square().mean().item()
            if self.ema is None:  # the callback swapped the EMA in already
                self.losses = {"ema": loss}
                return
            with self.ema.swapped():
                self.losses = {"raw": loss, "ema": self.net(batch).square().mean().item()}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.randn(32, 5, generator=torch.Generator()
                                                   .manual_seed(1)), batch_size=8)
    callback = None if manual else ema_lightning.EMA(decay=0.8)
    epochs = 1 if mode in ("manual", "callback-first") else 2
    # data_parallel_size=2: the parameters really are split over the two ranks ("auto" would
    # make a tensor-parallel mesh of 2 and leave fully_shard a data-parallel mesh of 1)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                         max_epochs=epochs, limit_val_batches=1, logger=False,
                         enable_checkpointing=mode == "callback-first", default_root_dir=root,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[] if callback is None else [callback])
    module = Module()
    ckpt = None
    if mode == "callback-resume":
        (ckpt,) = glob.glob(os.path.join(root, "checkpoints", "*.ckpt"))
    trainer.fit(module, data, data, ckpt_path=ckpt)
    ema = module.ema if callback is None else callback.ema
    assert ema is not None
    shadow = next(iter(ema.state_dict()["shadows"].values()))
    full = {k: v.full_tensor() for k, v in module.net.state_dict().items()}  # every rank
    average = {k: v.full_tensor() for k, v in ema.state_dict()["shadows"].items()}
    row = {"rank": trainer.global_rank, "step": ema.step, "num_updates": ema.num_updates,
           "sharded": type(shadow).__name__ == "DTensor" and shadow.to_local().shape[0] < 7,
           "global_step": trainer.global_step, **module.losses,
           "weights": {k: v.tolist() for k, v in full.items()},
           "average": {k: v.tolist() for k, v in average.items()}}
    with open(f"{out}.{trainer.global_rank}", "w") as f:
        f.write(json.dumps(row))
    import torch.distributed as dist

    if dist.is_initialized():  # else gloo's threads may abort the interpreter at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:4])
