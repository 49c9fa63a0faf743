"""``emakit bench``: time the EMA update of emakit and every installed peer against one flat pass.

Each model is built in plain torch (:mod:`emakit.bench.models`); each contender runs in a fresh
process (``--quick``: one process per model) and is timed in chunks interleaved with one flat
``lerp_`` over as many fp32 elements as the model has parameters (``x flat``; 1.00 is the
single-pass limit), discarding chunks during which other processes used the CPU; the output says
how many were discarded and how many CPUs other processes used meanwhile. Writes a markdown table
and JSON to ``--out`` (created if needed), named by device, threads and torch version.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from emakit.cli.errors import CLIError

__all__ = ["add_parser", "busy_summary", "run"]

QUICK_MODELS = ("tiny-gpt", "resnet50")
FULL_MODELS = ("tiny-gpt", "resnet50", "gpt2-small", "linear-4x")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark the EMA update against peers and a flat pass",
                       description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="two small models, one process per model, short chunks (< 2 minutes)")
    p.add_argument("--models", nargs="+", help="models to run (default: all four; --quick: two)")
    p.add_argument("--contenders", nargs="+", help="contenders to run (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--bf16", action="store_true",
                   help="also time emakit on bf16 copies of the models (fp32 shadows): "
                        "emakit, emakit loop, emakit flat, emakit eager, emakit flat eager, "
                        "emakit flat multi x2, or those of them given with --contenders")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for the .md and .json results (created if needed; default "
                        "benchmarks/results under the current folder)")
    p.set_defaults(run=run)


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "emakit.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode or not lines:
        raise CLIError(f"benchmark worker failed for {spec['model']} {spec['contenders']}:\n"
                       f"{proc.stderr[-2000:]}")
    rows: list[dict[str, Any]] = json.loads(lines[-1])
    return rows


def _load(r: dict[str, Any]) -> str:
    """The chunk pairs kept / discarded and the other processes' load during a row's timing."""
    if "chunks_kept" not in r:
        return ""
    others = r.get("others_cpus")
    load = "" if others is None else f", others {others:.2f} CPUs"
    if not r.get("quiet", True):
        return f"{r['chunks_kept']} incl. {r['chunks_discarded']} noisy (never quiet){load}"
    return f"{r['chunks_kept']} / {r['chunks_discarded']}{load}"


def _table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | params / tensors | dtype | contender | ms / update | x flat | GB/s | "
           "transient MB | chunks kept / discarded, load |", "|---" * 9 + "|"]
    for r in rows:
        head = (f"| {r['model']} | {r['params'] / 1e6:.1f}M / {r['tensors']} | {r['dtype']} | "
                f"{r['contender']} |")
        if "skipped" in r:
            out.append(f"{head} {r['skipped']} | | | | |")
            continue
        x = r["x_flat"] if r["contender"] != "emakit swap round trip" else float("nan")
        out.append(f"{head} {r['update_ms']:.3f} | {x:.2f} | {r['gb_s']:.1f} | "
                   f"{r.get('transient_mb', float('nan')):.1f} | {_load(r)} |")
    return "\n".join(out)


def busy_summary(rows: list[dict[str, Any]]) -> str:
    """One line on how busy the machine was while the rows were timed.

    Example:
        >>> busy_summary([{"chunks_kept": 15, "chunks_discarded": 0, "others_cpus": 0.01}])
        'machine quiet: 0 of 15 chunk pairs noisy (other processes: up to 0.01 CPUs)'
        >>> busy_summary([{"chunks_kept": 15, "chunks_discarded": 3, "others_cpus": 0.6}])
        'machine busy: 3 of 18 chunk pairs noisy and discarded (other processes: up to 0.60 CPUs)'
    """
    timed = [r for r in rows if "chunks_kept" in r]
    noisy = sum(r["chunks_discarded"] for r in timed)
    total = sum(r["chunks_kept"] + (r["chunks_discarded"] if r.get("quiet", True) else 0)
                for r in timed)
    never = sum(not r.get("quiet", True) for r in timed)
    loads = [r["others_cpus"] for r in timed if r.get("others_cpus") is not None]
    load = f"other processes: up to {max(loads):.2f} CPUs" if loads else "load not measured"
    if never:
        return (f"machine BUSY: {noisy} of {total} chunk pairs noisy; {never} row(s) never got "
                f"quiet and keep their noisy chunks; {load}. Rerun on an idle machine.")
    if noisy:
        return f"machine busy: {noisy} of {total} chunk pairs noisy and discarded ({load})"
    return f"machine quiet: 0 of {total} chunk pairs noisy ({load})"


def run(args: argparse.Namespace) -> int:
    from emakit.bench.contenders import CONTENDERS
    from emakit.bench.models import MODELS

    models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    contenders = args.contenders or list(CONTENDERS)
    for m in models:
        if m not in MODELS:
            raise CLIError(f"unknown model {m!r}; choose from {', '.join(MODELS)}.")
    for c in contenders:
        if c not in CONTENDERS:
            raise CLIError(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}.")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {str(args.out)!r} is a file, not a folder; give a folder for the "
                       ".md and .json results.")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}.")
    import torch

    if args.device not in ("cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise CLIError(f"--device must be cpu or cuda (cuda:N), got {args.device!r}.")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA "
                       "device. Run on a machine with a GPU, or use --device cpu.")
    args.out.mkdir(parents=True, exist_ok=True)

    threads = args.threads or torch.get_num_threads()
    base = {"device": args.device, "threads": threads,
            "chunks": 5 if args.quick else 15, "chunk_s": 0.03 if args.quick else 0.05}
    jobs: list[dict[str, Any]] = []
    for m in models:
        groups = [contenders] if args.quick else [[c] for c in contenders]
        jobs += [{**base, "model": m, "contenders": g} for g in groups]
        if args.bf16:
            bf16 = ["emakit", "emakit loop", "emakit flat", "emakit eager", "emakit flat eager",
                    "emakit flat multi x2"]
            chosen = [c for c in bf16 if c in contenders] if args.contenders else bf16
            if chosen:
                jobs.append({**base, "model": m, "contenders": chosen, "dtype": "bfloat16"})
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-")
    name = (f"update-peers-{device}-{threads}threads-torch{torch.__version__.split('+')[0]}"
            f"{'-quick' if args.quick else ''}")
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job['model']} {job.get('dtype', 'float32')}: "
              f"{', '.join(job['contenders'])}", file=sys.stderr, flush=True)
        new = _worker(job)
        for r in new:
            if "chunks_kept" in r:
                print(f"  {r['contender']}: {r['update_ms']:.3f} ms, x flat {r['x_flat']:.2f}; "
                      f"chunks kept / discarded {_load(r)}", file=sys.stderr, flush=True)
        rows += new
        _write(args.out / name, rows, device, threads, time.perf_counter() - started,
               done=i == len(jobs))  # after every job: a long run killed midway keeps its rows
    print(_table(rows))
    print(f"\n{busy_summary(rows)}")
    print(f"wrote {args.out / name}.md and .json in {time.perf_counter() - started:.0f} s")
    return 0


def _write(stem: Path, rows: list[dict[str, Any]], device: str, threads: int, seconds: float,
           *, done: bool) -> None:
    import torch

    from emakit.io import atomic_path

    meta = {"command": "emakit bench " + " ".join(sys.argv[2:]), "seconds": round(seconds, 1),
            "complete": done, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": threads, "device": device}
    with atomic_path(f"{stem}.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    with atomic_path(f"{stem}.md") as tmp:
        tmp.write_text(
            f"# EMA update vs peers ({device}, {threads} threads, torch {torch.__version__})\n\n"
            f"`{meta['command']}` ({seconds:.0f} s{'' if done else ', incomplete'}). x flat = "
            "median update time / median time of one lerp_ over one flat fp32 buffer of the "
            "same element count (bf16 rows: of the same bytes), timed interleaved; chunk pairs "
            "during which other processes used the CPU are discarded (last column: pairs kept / "
            "discarded, and the CPUs other processes used on average meanwhile). Swap rows: "
            "one `with "
            "ema.swapped(): pass` round trip (x flat not meaningful). every=4 rows: per optimizer "
            "step. Transient MB: bytes torch allocated during one update.\n\n"
            f"{_table(rows)}\n\n{busy_summary(rows)}\n")
