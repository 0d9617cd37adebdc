"""The end-of-run skip report (tests/_skip_report.py) and its strict mode, on small pytest runs."""

from __future__ import annotations

import pytest
from _data_paths import SKIP_REASON

from pgd_deploy.devices import describe_cpu

CONFTEST = """
import _skip_report

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "trt: needs TensorRT")
    _skip_report.register(config)
"""

TESTS = {
    "test_real.py": f"""
import pytest

def test_needs_coco128():
    pytest.skip({SKIP_REASON!r})

def test_runs():
    pass
""",
    "test_library.py": """
import pytest
pytest.importorskip("surely_not_an_installed_module")

def test_never_collected():
    pass
""",
    "test_devices.py": """
import pytest

@pytest.mark.gpu
def test_cuda():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.trt
@pytest.mark.skipif(True, reason="needs tensorrt, pycuda and a CUDA GPU")
def test_engine():
    pass

def test_browser():
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium")

def test_bf16_kernels():
    pytest.skip("this CPU has no bf16 kernels (avx512_bf16 or amx_bf16)")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
""",
}


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PGD_TEST_STRICT", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**TESTS)
    return pytester


def test_summary_names_every_skip_and_its_kind(suite: pytest.Pytester) -> None:
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 0  # not strict: the report only
    result.assert_outcomes(passed=1, skipped=6, xfailed=1)
    out = result.stdout.str()
    assert "NOT TESTED: 6 skipped (what and why)" in out
    # which CPU and kernel paths ran, at the head of the run and of the summary
    assert f"cpu: {describe_cpu()}" in out and f"ran on: {describe_cpu()}" in out
    assert "1 tests of kernels this CPU lacks (they run on CPUs that have them):" in out
    assert "test_devices.py::test_bf16_kernels" in out  # named: another CPU must run it
    assert "1 real-image tests (coco128 not found):" in out
    assert "test_real.py::test_needs_coco128" in out
    assert "1 tests whose optional library failed to import:" in out
    assert "could not import 'surely_not_an_installed_module'" in out
    assert "2 GPU / TensorRT tests (no CUDA GPU or TensorRT here):" in out
    assert "1 browser test (Chromium not installed):" in out
    assert "this run tested less than the suite: 1 real-image, 1 library skipped" in out
    assert "test_expected_failure" not in out.split("NOT TESTED")[1]  # xfail is not a skip


def test_strict_mode_fails_on_real_image_and_library_skips(suite, monkeypatch) -> None:
    monkeypatch.setenv("PGD_TEST_STRICT", "1")
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*PGD_TEST_STRICT=1: the run FAILS because tests were skipped (1 real-image, 1 library)*"]
    )


def test_strict_mode_accepts_gpu_trt_and_browser_skips(suite, monkeypatch) -> None:
    monkeypatch.setenv("PGD_TEST_STRICT", "1")
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "test_devices.py")
    assert result.ret == 0
    result.assert_outcomes(skipped=4, xfailed=1)
    out = result.stdout.str()
    assert "1 browser test (Chromium not installed):" in out  # reported, loudly
    assert "FAILS" not in out


def test_strict_mode_keeps_a_real_failure_a_failure(suite, monkeypatch) -> None:
    monkeypatch.setenv("PGD_TEST_STRICT", "1")
    suite.makepyfile(test_broken="def test_broken():\n    assert False\n")
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "test_broken.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
