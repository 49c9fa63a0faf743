"""The EMA of an FSDP2-sharded model over 2 gloo ranks (CPU): per-rank update time, collectives
per update, and rank 0's peak extra memory while ``emakit.save`` gathers one full file.

    python benchmarks/sharded_update.py [--params 100e6] [--repeats 20] [--out benchmarks/results]

- update: the median per-rank ``ema.update()`` time over the median time of one ``lerp_`` over a
  flat fp32 buffer of as many elements as the rank's local shard (``x flat``; 1.00 is the
  single-pass limit), timed interleaved; one torch thread per rank (2 ranks on 2 cores).
- collectives: counted at the c10d level and by DTensor's ``CommDebugMode`` during the timed
  updates (expected 0).
- save: each rank's resident memory sampled every millisecond during ``emakit.save``, its peak
  minus its value before, against the largest tensor's bytes (one gathered tensor at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "distributed"))


def model_of(params: float) -> nn.Module:
    width = 2048
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def rss() -> int:
    """This process's resident memory now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss())


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from scenarios import count_collectives
    from torch.distributed.fsdp import fully_shard

    import emakit

    model = model_of(args.params)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    ema = emakit.EMA(model, decay=0.999)
    local = sum(p.to_local().numel() for p in model.parameters())
    flat_src, flat_dst = torch.randn(local), torch.randn(local)
    for _ in range(3):
        ema.update()
        flat_dst.lerp_(flat_src, 0.001)
    ema_times, flat_times, calls = [], [], []
    for _ in range(args.repeats):
        dist.barrier()
        with count_collectives() as seen:
            t = time.perf_counter()
            ema.update()
            ema_times.append(time.perf_counter() - t)
        calls.extend(seen)
        t = time.perf_counter()
        flat_dst.lerp_(flat_src, 0.001)
        flat_times.append(time.perf_counter() - t)
    del flat_src, flat_dst
    largest = max(p.numel() * 4 for p in model.parameters())
    folder = Path(out)
    import gc

    gc.collect()
    dist.barrier()
    with PeakRSS() as memory:
        t = time.perf_counter()
        emakit.save(ema, folder / "ema.safetensors")
        save_s = time.perf_counter() - t
    extra = memory.peak - memory.start
    row = {"rank": rank, "local_elements": local, "update_ms": statistics.median(ema_times) * 1e3,
           "flat_ms": statistics.median(flat_times) * 1e3, "collectives": len(calls),
           "save_s": save_s, "save_peak_extra_bytes": extra, "largest_tensor_bytes": largest}
    row["x_flat"] = row["update_ms"] / row["flat_ms"]
    (folder / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from ranks import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, args, free_port(), tmp), nprocs=2)
        rows = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
        file_bytes = (Path(tmp) / "ema.safetensors").stat().st_size
    params = sum(p.numel() for p in model_of(args.params).parameters())
    result = {"params": params, "world": 2, "backend": "gloo", "device": "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "file_bytes": file_bytes, "ranks": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"sharded-update-cpu-2ranks-torch{torch.__version__.split('+')[0]}"
    lines = [f"# EMA of an FSDP2-sharded model, 2 gloo ranks on CPU (torch {torch.__version__})",
             "", f"`python benchmarks/sharded_update.py`: {params / 1e6:.1f}M parameters "
             f"(Linear 2048x2048 layers, each `fully_shard`-ed), one thread per rank.", "",
             "| rank | local elements | update ms | flat lerp ms | x flat (local shard) | "
             "collectives / update | save s | rank's peak extra MB during save | largest "
             "tensor MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['local_elements']:,} | {r['update_ms']:.1f} | "
                     f"{r['flat_ms']:.1f} | {r['x_flat']:.2f} | "
                     f"{r['collectives'] / args.repeats:g} | {r['save_s']:.2f} | "
                     f"{r['save_peak_extra_bytes'] / 1e6:.1f} | "
                     f"{r['largest_tensor_bytes'] / 1e6:.1f} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
