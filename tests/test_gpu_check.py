"""``bench/gpu_check.py --device cpu`` at small sizes, on a Python that cannot import Ray,
FAISS, pyarrow or fsspec, its optimizers taking CUDA's default foreach step (which cannot mix
DTensor and plain parameters in one optimizer): the GPU check needs only PyTorch, timm,
transformers and pydantic, trains with a falling loss in both precisions, and prints one line
of figures per part."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE = """
import importlib.abc, runpy, sys
class Bare(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "faiss", "pyarrow", "fsspec"):
            raise ImportError(f"{name} is not installed on a bare GPU machine")
sys.meta_path.insert(0, Bare())
import torch
adamw = torch.optim.AdamW.__init__
torch.optim.AdamW.__init__ = lambda self, *a, **k: adamw(self, *a, **{**k, "foreach": True})
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


@pytest.mark.parametrize("config", [None, "configs/gpu.yaml"])
def test_gpu_check_runs_on_cpu_without_ray_faiss_or_pyarrow(config):
    args = ["--device", "cpu", "--steps", "24", "--backbone", "resnet10t", "--image-size", "32"]
    args += ["--config", config] if config else []
    args += ["--batch", "16", "--classes", "40", "--embed-docs", "600"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-c", BARE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(rf"^device CPU, .* config {config or 'none'}", out, re.M), out
    for precision in ("bf16", "fp32"):
        line = re.search(
            rf"^train {precision}: ([\d.]+) samples/s, .* loss ([\d.]+) -> ([\d.]+)", out, re.M
        )
        assert line, out
        rate, first, last = map(float, line.groups())
        assert rate > 0 and last < first  # it learns
    assert re.search(r"^train bf16 / fp32 samples/s: [\d.]+x$", out, re.M), out
    assert re.search(r"^embed: documents [\d.]+/s, query photos [\d.]+/s \(float32\)$", out, re.M)
    assert "faiss: skipped (faiss is not installed on a bare GPU machine)" in out, out
