"""``emakit export``: write a checkpoint's EMA weights as a plain model state dict.

Reads emakit checkpoints and those of timm, Lightning, ema-pytorch, diffusers, torch-ema,
Ultralytics and AveragedModel (:mod:`emakit.io.layouts`); the output loads with
``model.load_state_dict`` without emakit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emakit.cli.errors import CLIError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    from emakit.io.export import DTYPES

    p = sub.add_parser("export", help="write a checkpoint's EMA weights as a model state dict",
                       description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="an emakit or other library's checkpoint")
    p.add_argument("--out", type=Path, required=True,
                   help="the file to write: .safetensors (recommended), .pt or .npz (numpy; "
                        "bfloat16 weights need --dtype float32 there)")
    p.add_argument("--dtype", choices=DTYPES, default="model",
                   help="model: the model's dtypes where the file records them, else as stored "
                        "(default); keep: as stored (the shadow dtype); or one floating dtype "
                        "for every floating tensor")
    p.add_argument("--names", type=Path,
                   help="parameter names, one per line (diffusers / torch-ema lists)")
    p.add_argument("--strip-prefix", help="remove this prefix from the names, e.g. 'module.'")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checksums of an emakit file (faster for huge files)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from emakit.io.export import export_weights, read_names

    names = None if args.names is None else read_names(args.names)
    if args.out.resolve() == args.checkpoint.resolve():
        raise CLIError("--out is the checkpoint itself; choose another file.")
    summary = export_weights(args.checkpoint, args.out, dtype=args.dtype, names=names,
                             strip_prefix=args.strip_prefix, verify=not args.no_verify)
    print(f"wrote {summary.tensors} tensors ({summary.bytes / 1e6:.1f} MB) of EMA weights to "
          f"{summary.path} (read as layout {summary.layout!r})")
    for note in summary.notes:
        print(f"emakit export: note: {note}", file=sys.stderr)
    return 0
