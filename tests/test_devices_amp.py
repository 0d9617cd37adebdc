"""`train.amp = "auto"` on the CPU: bf16 exactly where the CPU has bf16 instructions."""

from __future__ import annotations

import pytest
import torch

from pgd_deploy import devices

FLAGS = "flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_vnni{extra}\n"


def _cpuinfo(tmp_path, extra: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: test\n" + FLAGS.format(extra=extra))
    return str(path)


@pytest.mark.parametrize(
    ("extra", "isa"),
    [
        ("", None),
        (" avx512_bf16", "avx512_bf16"),
        (" avx512_bf16 amx_tile amx_bf16 amx_int8", "amx_bf16"),
        (" avx512_bf16x", None),  # whole flags only
    ],
)
def test_cpu_bf16_isa_reads_the_flags(tmp_path, extra, isa):
    assert devices.cpu_bf16_isa(_cpuinfo(tmp_path, extra)) == isa


def test_cpu_bf16_isa_without_cpuinfo_is_none(tmp_path):
    assert devices.cpu_bf16_isa(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(("isa", "dtype"), [(None, None), ("avx512_bf16", torch.bfloat16)])
def test_auto_amp_on_the_cpu_follows_the_bf16_instructions(monkeypatch, isa, dtype):
    monkeypatch.setattr(devices, "cpu_bf16_isa", lambda: isa)
    assert devices.autocast_setup("auto", torch.device("cpu")) == (dtype, None)
    assert devices.autocast_setup("off", torch.device("cpu")) == (None, None)
    assert devices.autocast_setup("bf16", torch.device("cpu")) == (torch.bfloat16, None)


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="needs CUDA"):
        devices.autocast_setup("fp16", torch.device("cpu"))


def test_describe_cpu_names_the_model_the_kernel_instructions_and_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    line = devices.describe_cpu(_cpuinfo(tmp_path, " avx512_bf16"))
    assert line.startswith("test (")
    isa = line.split(": ", 1)[1].split(";")[0]
    assert isa == "avx2, avx512f, avx512_vnni, avx512_bf16, no amx_bf16"
    assert "ATEN_CPU_CAPABILITY=default" in line and "oneDNN max SSE41" in line
    assert f"ATen {torch.backends.cpu.get_cpu_capability()}" in line
    assert f"{torch.get_num_threads()} threads" in line
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    avx2_only = devices.describe_cpu(_cpuinfo(tmp_path, ""))
    assert "oneDNN native" in avx2_only and "no avx512_bf16" in avx2_only


def test_describe_cpu_without_cpuinfo_says_the_flags_are_unknown(tmp_path):
    assert "flags unknown" in devices.describe_cpu(str(tmp_path / "absent"))
