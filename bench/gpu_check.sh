#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (a lent GPU is scarce: one call, then give it back):
# the `gpu`-marked tests, then the GPU benchmarks, last the speed tables of issue 12. Logs go to
# OUT (default runs/gpu_check); it stops at once (exit 2) where torch sees no CUDA GPU.
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
if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing to run" >&2
    exit 2
fi
$py -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
step tests $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
# TensorRT build/run (needs tensorrt), device buffers, ONNX Runtime GPU providers (onnxruntime-gpu)
step trt_tests $py -m pytest -q -p no:cacheprovider -m "trt or gpu" tests/test_export_trt.py \
  tests/test_runtime_cuda_buffers.py tests/test_runtime_providers.py
step pgd_gpu $py bench/pgd_gpu.py
step pgd_overhead $py bench/pgd_overhead.py --no-cpu
step train_step $py bench/train_step.py --amp bf16
# issue 12: teacher and student through the torch backend at 800x1344, batch 1 and 8: eager fp32,
# eager fp16, fp16 + channels-last + torch.compile (max-autotune; its compile time is reported)
step torch_speed $py bench/torch_speed.py --out "$out/torch_speed"
# the teacher-vs-student table on the GPU: torch fp32/fp16/bf16, ONNX Runtime (CUDA provider)
# fp32/fp16/int8, TensorRT plans when tensorrt is installed
step speed_table $py bench/export_latency.py --imgsz 800x1344 --batch 1,8 --device cuda \
  --iters 30 --out "$out/speed_table"
exit $status
