"""vLLM's load-aware speculation (``num_speculative_tokens_per_batch_size``, K chosen per running batch size, K=0
included) with NanoSpec on: greedy output identical to the same schedule without NanoSpec and to plain
speculation, and NanoSpec still drafts (its coverage counters move) on the steps that draft. The schedule below
switches between K=3, K=1 and K=0 as requests finish (batch of 6 with different lengths: EOS ends them)."""

from __future__ import annotations

import pytest

from .conftest import run_engine, spec_bench_prompts

pytestmark = pytest.mark.e2e
SCHEDULE = [[1, 2, 3], [3, 4, 1], [5, 64, 0]]


def test_dynamic_k_schedule_is_lossless_with_nanospec(qwen05b, tmp_path) -> None:
    prompts = spec_bench_prompts(1)[:6]
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3}
    base = {"model": str(qwen05b), "prompts": prompts, "max_tokens": 48}
    plain = run_engine(dict(base, spec=spec), tmp_path)
    dyn = dict(spec, num_speculative_tokens_per_batch_size=SCHEDULE)
    full = run_engine(dict(base, spec=dyn), tmp_path)
    ns = run_engine(dict(base, spec=dict(dyn, nanospec={})), tmp_path)
    assert ns["tokens"] == full["tokens"] == plain["tokens"]
    drafts = int(ns["metrics"]["vllm:spec_decode_num_draft_tokens"])
    assert 0 < drafts < int(plain["metrics"]["vllm:spec_decode_num_draft_tokens"]), "the schedule must cut drafts"
    tot = ns["pool"][0]["totals"]
    assert tot["target"] > 0 and 0 < tot["covered"] <= tot["target"], tot
