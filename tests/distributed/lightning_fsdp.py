"""Lightning's ModelParallelStrategy with ``fully_shard`` on 2 CPU processes, an emakit EMA created
in ``configure_model`` after sharding and attached in ``on_fit_start``; validation on the EMA.

Run as a script (Lightning starts the second process by running it again); prints one JSON line
per rank: the EMA's step, whether its shadows are DTensors, and the validation loss of the EMA
weights next to that of the training weights.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


def main(out: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    import emakit

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
            self.ema: emakit.EMA | None = None
            self.losses: dict[str, float] = {}

        def configure_model(self) -> None:
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])
            self.ema = emakit.EMA(self.net, decay=0.8)  # after sharding: local shadows

        def on_fit_start(self) -> None:
            assert self.ema is not None
            self.ema.attach(self.trainer.optimizers[0])

        def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
            return self.net(batch).square().mean()

        def validation_step(self, batch: torch.Tensor, _: int) -> None:
            assert self.ema is not None
            raw = self.net(batch).square().mean().item()
            with self.ema.swapped():
                ema = self.net(batch).square().mean().item()
            self.losses = {"raw": raw, "ema": ema}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.randn(32, 5, generator=torch.Generator()
                                                   .manual_seed(1)), batch_size=8)
    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(),
                         max_epochs=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, data, data)
    assert module.ema is not None
    shadow = module.ema.state_dict()["shadows"]["0.weight"]
    row = {"rank": trainer.global_rank, "step": module.ema.step,
           "num_updates": module.ema.num_updates, "sharded": type(shadow).__name__ == "DTensor",
           "global_step": trainer.global_step, **module.losses}
    with open(f"{out}.{trainer.global_rank}", "w") as f:
        f.write(json.dumps(row))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
