"""Where and how training runs: the device, the torchrun process group, mixed precision, the
memory layout and seeding (used by `trainer`; no state of their own)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from pgd_deploy import distributed as dist


def select_device(name: str) -> torch.device:
    """`auto` -> the local CUDA device when available (LOCAL_RANK under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)


BF16_ISA = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags, fastest first


# /proc/cpuinfo flags that choose the floating-point kernels of ATen and oneDNN, oldest first
KERNEL_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def _cpuinfo(cpuinfo: str) -> tuple[str, list[str]]:
    """(model name, flags) of the first processor in `cpuinfo`; ("", []) where unreadable."""
    model, flags = "", []
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def describe_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """One line naming the CPU and the kernel paths this process runs, for reports whose
    figures or outcomes depend on them (the test summary, benchmarks):

        AMD EPYC (x86_64, 2 threads): avx2, no avx512f, no avx512_vnni, no avx512_bf16,
        no amx_bf16; ATen AVX2, oneDNN native, bf16 kernels no

    ATen picks its vectorized kernels by instruction set (`ATEN_CPU_CAPABILITY=default|avx2|
    avx512` lowers the choice) and oneDNN its convolutions (`ONEDNN_MAX_CPU_ISA=SSE41|AVX2|...`);
    both are named as this process runs them, with the variable where it is set.
    """
    import platform

    model, flags = _cpuinfo(cpuinfo)
    isa = ", ".join(f if f in flags else f"no {f}" for f in KERNEL_ISA)
    isa = isa if flags else "flags unknown"
    aten = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        aten += f" (ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']})"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    onednn = f"max {onednn}" if onednn else "native"
    bf16 = "yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    name = model or platform.processor() or "unknown CPU"
    return (
        f"{name} ({platform.machine()}, {torch.get_num_threads()} threads): {isa}; "
        f"ATen {aten}, oneDNN {onednn}, bf16 kernels {bf16}"
    )


def cpu_bf16_isa(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's bf16 instructions that oneDNN's convolutions use ("amx_bf16" on Sapphire Rapids
    and later, "avx512_bf16" on Cooper Lake and AMD Zen 4), or None.

    With them bf16 training steps are faster than fp32: 0.58x the fp32 step time for the
    quickstart's R101 and 0.56x for its R50 on a 2-core AMD EPYC with avx512_bf16, and several times
    faster with AMX. Without them oneDNN emulates bf16: 2.1x the fp32 step time on the same EPYC
    with the instructions hidden (`bench/train_step.py`, train/README.md).
    """
    flags = _cpuinfo(cpuinfo)[1]
    return next((isa for isa in BF16_ISA if isa in flags), None)


def autocast_setup(cfg_amp: str, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for `train.amp` on this device.

    CUDA: `auto` = bf16 where supported, else fp16 with a grad scaler. CPU: `auto` = bf16 when the
    CPU has bf16 instructions (`cpu_bf16_isa`), else fp32; `fp16` is refused (no CPU grad
    scaling).
    """
    if cfg_amp == "off":
        return None, None
    if device.type == "cpu":
        if cfg_amp == "fp16":
            raise ValueError("train.amp='fp16' needs CUDA; use 'bf16' or 'off' on the CPU")
        if cfg_amp == "bf16" or cpu_bf16_isa():
            return torch.bfloat16, None
        return None, None
    if device.type != "cuda":
        return None, None
    if cfg_amp == "auto":
        cfg_amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cfg_amp == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def memory_format_for(setting: str, device: torch.device) -> torch.memory_format:
    """`train.channels_last`: `auto` = channels-last on CUDA, where cuDNN runs bf16/fp16
    convolutions in NHWC and would otherwise transpose around each one (bench/pgd_gpu.py
    measures it); the CPU keeps the default layout."""
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        return torch.channels_last
    return torch.contiguous_format


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: on CUDA a few backward kernels (nearest upsampling in the FPN) have no
        # deterministic version; they warn instead of stopping the run. CPU runs are bit-exact.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python's and numpy's streams in each worker."""
    seed = torch.initial_seed() % 2**32  # differs per worker and per epoch (DataLoader seeds it)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The global random streams (torch, CUDA, Python, numpy), as a checkpoint stores them."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    # RNG states are CPU byte tensors; a checkpoint loaded with map_location=cuda moves them
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
