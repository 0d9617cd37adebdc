#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (a lent GPU is scarce: one call, then give it back):
# the `gpu`-marked tests, then the GPU benchmarks. Logs go to OUT (default runs/gpu_check).
#
#   bash bench/gpu_check.sh [OUT]
#
# Needs torch + torchvision with CUDA, pycocotools, tqdm and matplotlib importable; the project is
# used from this checkout (PYTHONPATH), so no install is needed.
set -uo pipefail
out=${1:-runs/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi -L || true
$py -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
step tests $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
# TensorRT build/run (needs tensorrt), device buffers, ONNX Runtime GPU providers (onnxruntime-gpu)
step trt_tests $py -m pytest -q -p no:cacheprovider -m "trt or gpu" tests/test_export_trt.py \
  tests/test_runtime_cuda_buffers.py tests/test_runtime_providers.py
step pgd_gpu $py bench/pgd_gpu.py
step pgd_overhead $py bench/pgd_overhead.py --no-cpu
step train_step $py bench/train_step.py --amp bf16
exit $status
