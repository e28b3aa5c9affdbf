#!/usr/bin/env bash
# The generation checks that need a CUDA GPU, as one script: the smoke preset on the GPU, then the
# engine and engine + --compile against the naive loop on SD 1.4's full-size architecture (random
# weights) at 512x512 fp16, with MFU, wall-time breakdown and max pixel differences against the naive images;
# then generate --score against generation alone, the score command per precision, and the per-face
# tuning baselines in float16 (loss scaling on, losses finite).
# Usage: bash benchmarks/gpu_check.sh   (with f2d_bench importable, e.g. PYTHONPATH=.)
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-.} F2D_BENCH_CACHE=${F2D_BENCH_CACHE:-/tmp/f2d-bench-cache} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
echo "== smoke preset on cuda"
rm -rf /tmp/f2d-smoke-gpu
"$PY" -m f2d_bench generate --preset smoke --device cuda --out /tmp/f2d-smoke-gpu --no-progress
echo "== SD 1.4 architecture, random weights, 512x512, float16"
"$PY" benchmarks/generate_throughput.py --unet-config sd14 --device cuda --dtype float16 --size 512 \
    --faces 2 --seeds 4 --batch-size 8 16 40 ${GPU_CHECK_ARGS:-}
echo "== generate --score: scoring overlapped with generation, full-size scorers (random weights)"
"$PY" benchmarks/generate_throughput.py --unet-config sd14 --device cuda --dtype float16 --size 512 \
    --faces 2 --seeds 4 --batch-size 16 --no-compile --score --full-size-scorers
echo "== the score command on PNG files, per precision"
"$PY" benchmarks/score_throughput.py --command --device cuda --full-size --precision fp32 bf16 tf32
echo "== per-face tuning in float16 with loss scaling, SD 1.4 architecture (3 timed updates per method)"
"$PY" benchmarks/tune_throughput.py --unet-config sd14 --device cuda --dtype float16 --steps 3
