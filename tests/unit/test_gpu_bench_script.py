"""``scripts/gpu_bench.sh``, the one command for a GPU machine, checked where there is none: every benchmark
invocation in it parses, and a run without CUDA records each step's failure in ``summary.md`` and exits non-zero
(on a GPU machine the same run measures)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanospec_vllm.tools.bench import draft_step, kernels

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"


def test_script_is_valid_bash_and_its_bench_arguments_parse() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r'-m nanospec_vllm\.tools\.bench\.(kernels|draft_step) (--device cuda[^\n]*)', text)
    assert {m for m, _ in calls} == {"kernels", "draft_step"}
    for mod, args in calls:
        argv = shlex.split(args.replace('"$OUT/', '"/tmp/'))
        s, json_path, _ = {"kernels": kernels, "draft_step": draft_step}[mod].parse(argv)
        assert s.device == "cuda" and json_path and json_path.endswith(".json")
    s, _, _ = draft_step.parse(["--device", "cuda"])  # what the script measures: both 8B-class shapes, batch 1..64
    assert set(s.models) == {"llama-3.1-8b", "qwen2.5-7b"} and s.batches == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full benchmarks")
def test_run_without_cuda_records_every_step(tmp_path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, GPU_BENCH_SKIP_TESTS="1")
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=900, check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    # no CUDA device: every step fails (rc 3 / 2; 124 if a loaded machine outlasts a step's time limit)
    for name in ("env", "bench-kernels", "bench-draft-step"):
        assert re.search(rf"\| {name} \| failed \(rc=\d+\) \| \d+ \|", summary), summary
    assert "| kernel-tests | skipped: GPU_BENCH_SKIP_TESTS=1 |" in summary
    if "| bench-draft-step | failed (rc=2) |" in summary:
        assert "torch sees no CUDA device" in (tmp_path / "out" / "draft-step-cuda.txt").read_text()
    assert '"cuda_available": false' in (tmp_path / "out" / "env.json").read_text()
