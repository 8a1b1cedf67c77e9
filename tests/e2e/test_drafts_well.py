"""Tests that fail when NanoSpec drafts badly, ignores the switch or miscounts coverage (greedy identity alone
cannot: the target verifies every token, so a bad draft head is still lossless).

* Every id active (a hot set holding the whole vocabulary) must draft exactly the full head's tokens, so the
  accepted counts equal the full head's, for ``draft_model``, EAGLE and EAGLE-3 (the last also catches a wrong
  ``d2t`` mapping). The ``dense`` strategy is used there because vLLM's own head argmaxes bf16 logits: scoring in
  the weight's dtype reproduces its ties exactly, where fp32 scores could break a bf16 tie the other way.
* On-only vs off-only jobs on the same prompts: the switch moves NanoSpec's own counters only when on, the
  default policy keeps real coverage (``0 < covered < total``) and loses acceptance only where the set missed.
"""

from __future__ import annotations

import pytest

from .conftest import run_engine, spec_bench_prompts
from .heads import make_eagle3_head, make_eagle_head

pytestmark = pytest.mark.e2e
V = 151_936
MAX_TOKENS = 32
K = 3


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return spec_bench_prompts(1)[:6]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("drafts-well")


@pytest.fixture(scope="module")
def all_ids(workdir):
    p = workdir / "all-ids.txt"
    p.write_text("\n".join(str(i) for i in range(V)))
    return {"hot_set_path": str(p), "hot_set_size": None, "capacity": V + 1, "target_topk": 0,
            "dense_fallback_ratio": 1e-6, "always_active_special_ids": False, "guard_coverage": 0}


def _accepted(res: dict) -> tuple[int, int]:
    m = res["metrics"]
    return int(m["vllm:spec_decode_num_accepted_tokens"]), int(m["vllm:spec_decode_num_draft_tokens"])


def _drafter(method: str, qwen05b, workdir) -> str:
    if method == "draft_model":
        return str(qwen05b)
    if method == "eagle":
        return str(make_eagle_head(workdir / "eagle"))
    return str(make_eagle3_head(workdir / "eagle3", reduced=True))


@pytest.mark.parametrize("method", ["draft_model", "eagle", "eagle3"])
def test_every_id_active_accepts_exactly_as_the_full_head(method, qwen05b, prompts, workdir, all_ids):
    spec = {"method": method, "model": _drafter(method, qwen05b, workdir), "num_speculative_tokens": K}
    base = {"model": str(qwen05b), "prompts": prompts, "max_tokens": MAX_TOKENS}
    full = run_engine(dict(base, spec=spec), workdir)
    every = run_engine(dict(base, spec=dict(spec, nanospec=all_ids)), workdir)
    assert every["tokens"] == full["tokens"]
    acc_full, drafts_full = _accepted(full)
    acc_every, drafts_every = _accepted(every)
    assert drafts_full > 0 and (acc_every, drafts_every) == (acc_full, drafts_full), (
        f"{method}: every id active accepted {acc_every}/{drafts_every}, the full head {acc_full}/{drafts_full}")
    tot = every["pool"][0]["totals"]
    assert tot["target"] > 0 and tot["covered"] == tot["target"], "with every id active nothing can be missed"
    assert tot["sparse_rows"] > 0 and tot["fallback"] == 0, tot  # NanoSpec's head drafted them, not vLLM's
    assert tot["no_step"] == 0, tot  # every draft hook ran inside a step (sample_tokens)


@pytest.fixture(scope="module")
def on_off(qwen05b, prompts, workdir):
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": K, "nanospec": {}}
    base = {"model": str(qwen05b), "prompts": prompts, "max_tokens": MAX_TOKENS, "spec": spec}
    on = run_engine(dict(base, switches=[1] * len(prompts)), workdir)
    off = run_engine(dict(base, switches=[0] * len(prompts)), workdir)
    return on, off


def test_switch_off_moves_no_nanospec_counter(on_off):
    on, off = on_off
    assert on["tokens"] == off["tokens"]
    t_on, t_off = on["pool"][0]["totals"], off["pool"][0]["totals"]
    assert t_off["size_n"] == 0 and t_off["target"] == 0, "an off request must get no slot and count nothing"
    assert t_off["sparse_rows"] == 0, "no row may reach the sparse head when every request is off"
    assert t_on["size_n"] > 0 and t_on["target"] > 0, "an on request must draft from a set and count coverage"
    assert t_on["sparse_rows"] > 0 and t_on["fallback"] == 0, t_on  # the sparse head drafted, never handed back


def test_default_policy_coverage_and_acceptance(on_off):
    on, off = on_off
    t = on["pool"][0]["totals"]
    assert 0 < t["covered"] < t["target"], t  # real coverage, counted: neither nothing nor everything
    acc_on, drafts_on = _accepted(on)
    acc_off, drafts_off = _accepted(off)
    # the 0.5B drafting for itself: the full head accepts nearly everything; the sparse head loses acceptance
    # where the set missed (measured with target_topk 3: 88/189 on vs 114/114 off, 0.47 relative), but a head
    # that drafted badly (random ids from the set, a wrong row map) would accept next to nothing
    assert acc_off > 0.8 * drafts_off
    assert acc_on / drafts_on > 0.3 * (acc_off / drafts_off), (acc_on, drafts_on, acc_off, drafts_off)
    assert acc_on <= acc_off + 0.02 * drafts_off  # a pruned head cannot beat the exact one by more than noise
    # the set missed target tokens at drafted positions (covered < target above), and a draft from the set cannot
    # be a missed token: strictly below the full head's rate. vLLM's head drafting in its place would equal it.
    assert acc_on / drafts_on < acc_off / drafts_off, (acc_on, drafts_on, acc_off, drafts_off)
