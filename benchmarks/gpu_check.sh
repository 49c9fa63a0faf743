#!/usr/bin/env bash
# Every GPU check of emakit in one run, for a session that is lent a GPU machine (the device tool):
#     bash benchmarks/gpu_check.sh            (device `run`, timeout_s 560: leaves time to rerun)
# The machine has no network; its python3 holds torch (CUDA), timm, lightning, transformers,
# safetensors, pytest and hypothesis. emakit runs from src/ without installing. Peers that are not
# there (ema-pytorch, torch-ema, diffusers) are skipped by `emakit bench` and say so in the table.
# Everything lands in $OUT (the device tool brings it back): commit the result files into
# benchmarks/results/ and the pytest output into the closing note.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"
# 1. the CUDA tests (tests/test_gpu.py: fast path = loop, no sync, guard, offload, side stream)
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt"
# 2. the update against its peers (one process per contender and model: about 6-10 s each, an
#    estimate -- this script has not run on a GPU yet), then the bf16 rows with --quick (one
#    process per model); two folders, as the result files share a name
timeout 200 python3 -m emakit bench --device cuda --models tiny-gpt resnet50 gpt2-small linear-4x \
  --contenders "emakit" "emakit flat" "emakit flat skip_nonfinite" "timm ModelEmaV3" \
  "AveragedModel foreach" --out "$OUT/fp32" 2>&1 | tee "$OUT/bench-fp32.txt"
timeout 100 python3 -m emakit bench --device cuda --quick --bf16 --contenders "emakit" "emakit flat" \
  --models tiny-gpt resnet50 gpt2-small linear-4x --out "$OUT/bf16" 2>&1 | tee "$OUT/bench-bf16.txt"
# 3. host (offloaded) shadows of a GPU model: exposed ms per training step
timeout 80 python3 benchmarks/offload_overlap.py --device cuda 2>&1 | tee "$OUT/offload.txt"
cp benchmarks/results/*cuda* "$OUT"/ 2>/dev/null
ls -laR "$OUT"
