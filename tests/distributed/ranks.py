"""Run named scenarios on N gloo ranks (CPU) in one process group, and collect the outcomes.

One ``torch.multiprocessing.spawn`` per world size runs every scenario in turn (starting ranks
costs seconds; a scenario costs milliseconds). Each scenario is a function ``(rank, world, tmp)``
in a module; an ``AssertionError`` or any exception on a rank is recorded with its traceback and
the next scenario runs after a barrier, so one failure does not hide the others. A scenario that
hangs is cut by the spawn's timeout (the test then fails naming what had not finished).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, module: str, names: Sequence[str], tmp: str,
            port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # torch.distributed's own deprecation chatter
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    scenarios = importlib.import_module(module)
    out: dict[str, Any] = {}
    path = Path(tmp) / f"results-{rank}.json"
    for name in names:
        folder = Path(tmp) / name
        if rank == 0:
            folder.mkdir(exist_ok=True)
        dist.barrier()
        try:
            getattr(scenarios, name)(rank, world, folder)
            out[name] = "ok"
        except BaseException:  # recorded, so the other scenarios still run
            out[name] = traceback.format_exc()
        path.write_text(json.dumps(out))
        dist.barrier()
    dist.destroy_process_group()


def run_scenarios(module: str, names: Sequence[str], world: int, tmp: Path,
                  timeout: float = 300.0) -> dict[str, list[str]]:
    """Run ``names`` from ``module`` on ``world`` ranks; name -> each rank's outcome."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(world, module, list(names), str(tmp), free_port()),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                break
    except mp.ProcessExitedException:  # a rank died: report what the files hold
        pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = [json.loads((tmp / f"results-{r}.json").read_text())
               if (tmp / f"results-{r}.json").exists() else {} for r in range(world)]
    return {n: [res.get(n, "did not finish") for res in results] for n in names}
