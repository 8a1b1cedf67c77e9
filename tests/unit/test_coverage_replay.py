"""The coverage replay's step simulation on tiny fakes: known drafts and targets -> known counts and miss reasons."""

import numpy as np
import pytest
import torch

from nanospec_vllm.tools.bench.coverage import (
    DenseScorer,
    Policy,
    PromptData,
    aggregate,
    parse_policy,
    simulate,
)

V = 20


def scores_for(y, V=V):
    """Row i: y[i] scores 10, every other id j scores -0.01 j (so the best other active id is the lowest)."""
    s = -0.01 * torch.arange(V, dtype=torch.float32).repeat(len(y), 1)
    for i, t in enumerate(y):
        s[i, t] = 10.0
    return s


def top_rows(n, extra=None):
    top = np.full((n, 64), -1, dtype=np.int64)
    top[:, 0] = 19
    for (i, r), t in (extra or {}).items():
        top[i, r] = t
    return top


def test_chain_counts_coverage_and_miss_reasons():
    y = [1, 2, 5, 3, 7, 2]
    data = PromptData("t", np.array([1, 2, 3]), np.array(y), top_rows(6, {(1, 1): 7}))
    pol = Policy("no-topk", target_topk=0, add_draft_tokens=False)
    r = simulate(data, pol, DenseScorer(scores_for(y)), k=2, vocab_size=V)
    # full head: step at p=1 accepts 2 (emits 3), step at p=4 accepts 2 (emits the last 2)
    assert (r.steps_full, r.tokens_full) == (2, 5)
    # sparse: p=1 draft 2 ok, 5 missing -> picks 1 (emit 2); p=3: 3 ok, 7 missing (emit 2); p=5: 2 ok (emit 1)
    assert (r.steps_sparse, r.tokens_sparse) == (3, 5)
    assert (r.drafted, r.covered, r.agree) == (5, 3, 3)
    assert r.drafted_pos == [3, 2] and r.covered_pos == [3, 0]
    # 5 never appeared; 7 was in the target's top-64 (rank 2) at the verified row 1 but the policy adds no top-k
    assert r.misses == {"never": 1, "beyond_topk": 1, "dropped": 0, "other": 0}
    assert r.sizes == [3, 4, 5]  # {1,2,3}, then +5, then +7


def test_target_topk_adds_the_next_token_and_restores_acceptance():
    y = [1, 2, 5, 3, 7, 2]
    data = PromptData("t", np.array([1, 2, 3]), np.array(y), top_rows(6, {(1, 1): 7}))
    r = simulate(data, Policy("topk-2", target_topk=2, add_draft_tokens=False), DenseScorer(scores_for(y)), 2,
                 vocab_size=V)
    # 7 (rank 2 of row 1) is added when row 1 is verified, before the step at p=3 drafts it
    assert r.covered == r.drafted - 1 and r.misses["never"] == 1 and r.misses["beyond_topk"] == 0
    assert r.tokens_sparse / r.steps_sparse == pytest.approx(5 / 2)


def test_dropped_by_full_set():
    y = [1, 5, 5]
    data = PromptData("t", np.array([1, 2, 3]), np.array(y), top_rows(3))
    r = simulate(data, Policy("cap3", capacity=3, target_topk=0, add_draft_tokens=False),
                 DenseScorer(scores_for(y)), 1, vocab_size=V)
    assert r.misses == {"never": 1, "dropped": 1, "beyond_topk": 0, "other": 0}
    assert r.dropped >= 1 and r.sizes == [3, 3]


def test_all_ids_policy_matches_full_head():
    rng = np.random.default_rng(0)
    y = rng.integers(0, V, 40).tolist()
    s = torch.from_numpy(rng.standard_normal((40, V)).astype(np.float32))
    for i in range(0, 40, 2):
        s[i, y[i]] = 5.0  # the drafter is right on every other row
    data = PromptData("t", np.array([0]), np.array(y), top_rows(40))
    r = simulate(data, parse_policy("all"), DenseScorer(s), 4, vocab_size=V)
    assert r.agree == r.drafted and r.covered == r.drafted
    assert (r.steps_sparse, r.tokens_sparse) == (r.steps_full, r.tokens_full)
    tiny = simulate(data, Policy("tiny", capacity=2, target_topk=0, add_draft_tokens=False), DenseScorer(s), 4,
                    vocab_size=V)
    assert tiny.agree < tiny.drafted


def test_sorted_batches_emulate_lowest_ids_winning():
    y = [1, 9, 9]
    top = top_rows(3)
    top[0, :3] = [9, 4, 3]  # the row predicting y[0]; the runtime order puts y[0] then 9, 4, 3
    data = PromptData("t", np.array([1]), np.array(y), top)
    arrival = simulate(data, Policy("a", capacity=3, target_topk=3, add_draft_tokens=False),
                       DenseScorer(scores_for(y)), 1, vocab_size=V)
    lowest = simulate(data, Policy("s", capacity=3, target_topk=3, add_draft_tokens=False, sorted_batches=True),
                      DenseScorer(scores_for(y)), 1, vocab_size=V)
    assert arrival.covered == 1 and arrival.tokens_sparse == 2  # 9 (top-1) kept: drafted and accepted
    assert lowest.covered == 0 and lowest.misses["dropped"] == 2  # 3 and 4 kept, 9 dropped (both steps)
    assert lowest.tokens_sparse == 2 and lowest.steps_sparse == 2  # one token per step


def test_screen_extra_ids_are_scored_exactly_not_added():
    y = [1, 7, 7]
    data = PromptData("t", np.array([1]), np.array(y), top_rows(3))
    screen = np.array([[0, 0], [7, 0], [0, 0]])
    pol = Policy("scr", target_topk=0, add_draft_tokens=False, screen_r=8, screen_m=2)
    r = simulate(data, pol, DenseScorer(scores_for(y)), 1, vocab_size=V, screen=screen)
    # row 1: 7 is not active (a coverage miss) but the screen finds it, scored exactly -> drafted and accepted
    assert (r.drafted, r.covered, r.agree, r.full_missing, r.screen_recall) == (1, 0, 1, 1, 1)
    assert (r.steps_sparse, r.tokens_sparse) == (1, 2)
    no = simulate(data, Policy("no", target_topk=0, add_draft_tokens=False), DenseScorer(scores_for(y)), 1,
                  vocab_size=V)
    assert (no.agree, no.tokens_sparse, no.steps_sparse) == (1, 2, 2)  # row 2 drafts the emitted 7


def test_parse_policy_and_aggregate():
    p = parse_policy("topk-16+hot-1024+fifo+rank+screen-64-32")
    assert (p.target_topk, p.hot, p.full_policy, p.order, p.screen_r, p.screen_m) == (16, 1024, "fifo", "runtime", 64, 32)
    assert parse_policy("paper").prompt_topk and parse_policy("paper").target_topk == 3
    with pytest.raises(ValueError):
        parse_policy("topk-3+bogus")
    y = [1, 2, 5, 3, 7, 2]
    data = PromptData("g1", np.array([1, 2, 3]), np.array(y), top_rows(6))
    r1 = simulate(data, Policy("x", target_topk=0), DenseScorer(scores_for(y)), 2, vocab_size=V)
    agg = aggregate([r1], 2)
    assert set(agg["x"]) == {"g1", "ALL"}
    g = agg["x"]["g1"]
    assert g["coverage"] == pytest.approx(r1.covered / r1.drafted)
    assert g["tau_ratio"] == pytest.approx(r1.tau_sparse / r1.tau_full)
    assert len(g["coverage_pos"]) == 2 and sum(g["misses"].values()) == r1.drafted - r1.covered


def test_replay_candidate_order_is_the_runtimes() -> None:
    """The replay orders a verification's candidates as the runtime does (step.verified_update: emitted, then all
    top-1s, then all top-2s), not row by row as it once did; ``+row`` keeps the old order for comparison."""
    import numpy as np

    from nanospec_vllm.tools.bench.coverage_replay import _order_candidates, parse_policy

    top = np.array([[10, 11, 12], [20, 21, 22]])
    assert _order_candidates([5, 6], top, "runtime") == [5, 6, 10, 20, 11, 21, 12, 22]
    assert _order_candidates([5, 6], top, "row") == [5, 6, 10, 11, 12, 20, 21, 22]
    assert _order_candidates([5], None, "runtime") == [5]
    assert parse_policy("defaults").order == "runtime" and parse_policy("paper+row").order == "row"
