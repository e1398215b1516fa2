#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (the device tool), under 8 minutes
# on one H100/H200. Everything it measures lands in $OUT:
#   gpu.txt       the card, driver, torch and Triton
#   tests.txt     pytest -m cuda: every backend-equivalence, GEMM-mode and layer test on CUDA
#                 tensors, a training step that must never wait for the GPU, the app on the GPU
#   bench.txt/.json  scripts/bench.py: resnet50 224x224 batch 128, channels_last: fp32, bf16 AMP
#                 and q8_bifurcated and q8_paper in every GEMM mode (step time, img/s, peak
#                 memory, saved); q8_paper's convs take one range per tensor, so their forward
#                 runs in each mode, q8_bifurcated's (a range per channel) dequantized
#   curves.json   scripts/gemm_curves.py: 300 seeded steps per GEMM mode and seed (resnet18)
#   train.txt     python train.py trainer=gpu logger=csv, one epoch on digits
#   bench_compile.txt/.json  scripts/bench.py --compile: fp32, bf16 AMP and q8_bifurcated, eager
#                 and torch.compile'd (last: compiling may use the rest of the time)
#
# Before the call, here: bash scripts/gpu_wheels.sh (Hydra, which the device image lacks);
# then carry `.whl`:  device run --carry .whl "bash scripts/gpu_check.sh"
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # q8 from this checkout: the image lacks it
: "${OUT:?OUT must name the folder for the results}"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
py=${PYTHON:-python3}  # the device image's python3 holds PyTorch
if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton",
triton.__version__, torch.cuda.get_device_name())'
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "exit $?" >>"$OUT/$name.txt"
    tail -n 25 "$OUT/$name.txt"
}

step bench 200 "$py" scripts/bench.py --device cuda --model resnet50 --image-size 224 \
    --batch 128 --presets fp32,q8_bifurcated,q8_paper --gemm dequantized,codes,int8 --steps 10 \
    --warmup 3 --json "$OUT/bench.json"
step tests 180 "$py" -m pytest -q -m cuda -p no:cacheprovider tests/
step curves 90 "$py" scripts/gemm_curves.py --device cuda --steps 300 --seeds 0,1,2 \
    --out /tmp/curves
cp /tmp/curves/verdict.json "$OUT/curves.json" 2>/dev/null
step train 60 "$py" train.py trainer=gpu logger=csv trainer.max_epochs=1 \
    hydra.run.dir=/tmp/q8-gpu-run
step bench_compile 150 "$py" scripts/bench.py --device cuda --model resnet50 --image-size 224 \
    --batch 128 --compile --steps 10 --warmup 3 --json "$OUT/bench_compile.json"
