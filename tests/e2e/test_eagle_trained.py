"""``nanospec train-eagle --quick`` end to end on the real Qwen2.5-Coder-0.5B target.

The toy run (6 prompts, 24 generated tokens each, 4 training steps) goes through every stage: vLLM generation,
transformers features, training, held-out acceptance with vLLM, atomic publish with a card. The head it
writes must load in vLLM with ``method: eagle`` and draft (drafts > 0), greedy output must be token-identical
to no speculation (with NanoSpec on too), and a second call must be a cache hit (same folder, untouched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nanospec_vllm.tools.calibration import calibration_prompts

from .conftest import run_engine

pytestmark = pytest.mark.e2e


def _train(target, cache, out) -> tuple[str, float]:
    env = dict(os.environ, NANOSPEC_CACHE=str(cache))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "nanospec_vllm.cli", "train-eagle", str(target), "--quick", "-q",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def test_train_eagle_quick_loads_drafts_identical_and_caches(qwen05b, tmp_path):
    out = tmp_path / "head"
    printed, first_s = _train(qwen05b, tmp_path / "cache", out)
    assert printed == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["card.json", "card.md", "config.json", "model.safetensors"]
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["steps"] == 4 and card["data"]["generated_tokens"] > 0
    assert card["acceptance_heldout"]["num_drafts"] > 0 and len(card["acceptance_heldout"]["accept_per_pos"]) == 3
    assert not list(out.parent.glob(".head.*"))  # no temporary folder left behind
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    prompts = [p.prompt for p in calibration_prompts(4, seed=101)]
    base = run_engine({"model": str(qwen05b), "prompts": prompts, "max_tokens": 32}, tmp_path)
    spec = {"method": "eagle", "model": str(out), "num_speculative_tokens": 3}
    eagle = run_engine({"model": str(qwen05b), "prompts": prompts, "max_tokens": 32, "spec": spec}, tmp_path)
    nano = run_engine({"model": str(qwen05b), "prompts": prompts, "max_tokens": 32,
                       "spec": dict(spec, nanospec={"target_topk": 16})}, tmp_path)
    assert eagle["tokens"] == base["tokens"] and nano["tokens"] == base["tokens"]
    assert eagle["metrics"]["vllm:spec_decode_num_drafts"] > 0 and nano["metrics"]["vllm:spec_decode_num_drafts"] > 0

    printed2, second_s = _train(qwen05b, tmp_path / "cache", out)
    assert printed2 == str(out) and (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert second_s < min(30.0, first_s)  # cache hit: no engine, no training
