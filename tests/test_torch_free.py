"""The runtime and the serving code import without torch (and without gradio at import time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

MODULES = [
    "pgd_deploy",
    "pgd_deploy.runtime",
    "pgd_deploy.runtime.preprocess",
    "pgd_deploy.runtime.postprocess",
    "pgd_deploy.runtime.agreement",
    "pgd_deploy.runtime.timing",
    "pgd_deploy.runtime.manifest",
    "pgd_deploy.runtime.backend_base",
    "pgd_deploy.runtime.backends",
    "pgd_deploy.runtime.torch_backend",  # torch only when a checkpoint is opened
    "pgd_deploy.runtime.contract",
    "pgd_deploy.runtime.providers",
    "pgd_deploy.config",
    "pgd_deploy.cli_support",
    "pgd_deploy.serve",
    "pgd_deploy.serve.sources",
    "pgd_deploy.serve.batcher",
    "pgd_deploy.serve.draw",
    "pgd_deploy.serve.outputs",
    "pgd_deploy.serve.predictor",
    "pgd_deploy.serve.side_by_side",
    "pgd_deploy.serve.gradio_app",
    "pgd_deploy.serve.command",
    "pgd_deploy.serve.shards",
    "pgd_deploy.serve.ray_engine",  # ray itself only when a run starts
    "pgd_deploy.serve.ray_stages",
]


def test_runtime_and_serve_import_without_torch() -> None:
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        for name in {MODULES!r}:
            importlib.import_module(name)
        heavy = sorted(m for m in ("torch", "torchvision", "gradio", "onnxruntime", "pycocotools",
                                   "matplotlib", "pandas") if sys.modules.get(m) is not None)
        print("heavy:", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout


def test_predict_help_runs_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pgd_deploy.serve.command import main\n"
        "sys.exit(main(['predict', '--help']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--source" in proc.stdout and "--save-images" in proc.stdout
