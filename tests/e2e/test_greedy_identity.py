"""Greedy output is token-identical with NanoSpec on, with it off (full-head speculation) and with no
speculation: real vLLM engine, real Qwen2.5-Coder-0.5B target, 24 Spec-Bench prompts (4 from each of 6
categories) x 64 tokens, for ``draft_model`` (the 0.5B drafting for itself), EAGLE and EAGLE-3 (random heads; the
EAGLE-3 head drafts over a reduced 32k vocabulary through ``d2t``). Batches mix requests that switch NanoSpec off.
"""

from __future__ import annotations

import pytest

from .conftest import run_engine, spec_bench_prompts
from .heads import make_eagle3_head, make_eagle_head

pytestmark = pytest.mark.e2e
MAX_TOKENS = 64
K = 3


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    p = spec_bench_prompts(4)
    assert len(p) >= 20
    return p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("identity")


@pytest.fixture(scope="module")
def baseline(qwen05b, prompts, workdir):
    return run_engine({"model": str(qwen05b), "prompts": prompts, "max_tokens": MAX_TOKENS}, workdir)


@pytest.fixture(scope="module")
def draft_model_run(qwen05b, prompts, workdir):
    # every prompt twice in one batch: NanoSpec on (default) and switched off per request (full head)
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": K, "nanospec": {}}
    job = {"model": str(qwen05b), "prompts": prompts + prompts, "switches": [None] * len(prompts) + [0] * len(prompts),
           "max_tokens": MAX_TOKENS, "spec": spec}
    return run_engine(job, workdir)


def _assert_identical(got: list[list[int]], want: list[list[int]], label: str) -> None:
    assert len(got) == len(want)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{label}: {len(bad)} of {len(want)} outputs differ (first: prompt {bad[0]})"
    assert all(len(w) > 0 for w in want)


def test_draft_model_nanospec_on_is_identical(baseline, draft_model_run, prompts):
    n = len(prompts)
    _assert_identical(draft_model_run["tokens"][:n], baseline["tokens"], "draft_model + NanoSpec")


def test_draft_model_nanospec_off_is_identical(baseline, draft_model_run, prompts):
    n = len(prompts)
    _assert_identical(draft_model_run["tokens"][n:], baseline["tokens"], "draft_model, NanoSpec off per request")


def test_draft_model_speculation_really_ran(draft_model_run):
    m = draft_model_run["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    # the 0.5B drafting for itself: many drafts accepted, whether from the active set or the full head
    assert m["vllm:spec_decode_num_accepted_tokens"] > 0.3 * m["vllm:spec_decode_num_draft_tokens"]
    (pool,) = draft_model_run["pool"]
    assert pool["in_use"] == 0, "finished requests must release their slots"
    assert pool["head_rows"] == 151_936 and pool["row_index"] is False


@pytest.mark.parametrize("variant", ["eagle", "eagle3", "eagle3-full-vocab"])
def test_eagle_heads_identical(variant, qwen05b, prompts, baseline, workdir):
    method = variant.split("-")[0]
    if method == "eagle":
        head = make_eagle_head(workdir / variant)
    else:
        head = make_eagle3_head(workdir / variant, reduced=variant == "eagle3")
    spec = {"method": method, "model": str(head), "num_speculative_tokens": K, "nanospec": {"capacity": 1024}}
    switches = [0 if i % 3 == 2 else None for i in range(len(prompts))]  # a third of the batch off
    res = run_engine({"model": str(qwen05b), "prompts": prompts, "switches": switches, "max_tokens": MAX_TOKENS,
                      "spec": spec}, workdir)
    _assert_identical(res["tokens"], baseline["tokens"], f"{variant} + NanoSpec")
    assert res["metrics"]["vllm:spec_decode_num_drafts"] > 0
    (pool,) = res["pool"]
    assert pool["in_use"] == 0
    if variant == "eagle3":
        assert pool["head_rows"] == 32_000 and pool["row_index"] is True  # reduced d2t vocabulary used
    else:  # EAGLE-1 shares the target's lm_head (read, never modified); full-vocab EAGLE-3 has its own
        assert pool["head_rows"] == 151_936 and pool["row_index"] is False
