"""The draft head's per-step path (``kernel: union`` / ``auto``): the union's rows gathered once per step and
reused at every draft position, the ``auto`` choice from lagged sizes, drafts equal to the per-request kernel's,
and no host read of device data (the counter of ``test_host_sync``)."""

from __future__ import annotations

import pytest
import torch

from nanospec_vllm.ops import cost
from nanospec_vllm.vllm import head as head_mod

from .test_host_sync import DEVICES, H, HostReadCounter, V, _admit, _host_tensors, _inputs, _runner, _step

REQS = {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")}
UNION_ONLY = cost.CostModel((1e9, 0.0), (1e9, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), "test: union wins")
DENSE_ONLY = cost.CostModel((1e9, 0.0), (0.0, 0.0, 0.0), (1e9, 0.0, 0.0), (1e9, 0.0, 0.0), "test: dense wins")


@pytest.fixture(autouse=True, scope="module")
def _warm_counter():
    """The dispatcher mode's first use in a process runs one-off library code: do it outside the measured steps."""
    x = torch.arange(4)
    with HostReadCounter(host=[x]):
        torch.where(x > 1, x, torch.full_like(x, 9))


def _drafts(cfg: dict, device: str, greedy: bool, steps: int = 2):
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).to(device)
    r, rt, proposer = _runner(dict({"target_topk": 2, "capacity": 64}, **cfg), device, w)
    qsl = torch.tensor([0, 3, 5, 6])
    r.input_batch.num_computed_tokens_cpu[:] = [0, 0, 0, 0]
    r.input_batch.num_prompt_tokens[:] = [3, 2, 1, 0]
    seen = []
    orig = proposer._sample_from_logits
    proposer._sample_from_logits = lambda logits, md: (seen.append(logits.clone()), orig(logits, md))[1]
    after = []
    real_after = rt.after_propose
    rt.after_propose = lambda d: (after.append(d.clone()), real_after(d))[1]
    inputs = _inputs(device)
    with HostReadCounter(host=[*_host_tensors(rt, qsl), *rt.head.host_buffers()]) as c:
        _admit(r, rt, REQS)
        for _ in range(steps):
            _step(r, rt, proposer, inputs, greedy, qsl)
    return rt, c.events, after, seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("model", [None, UNION_ONLY, DENSE_ONLY], ids=["union", "auto-union", "auto-dense"])
def test_union_and_auto_draft_like_per_request_without_host_reads(device: str, greedy: bool, model, monkeypatch):
    _, _, ref_drafts, ref_logits = _drafts({"kernel": "torch"}, device, greedy)
    if model is None:
        cfg = {"kernel": "union"}
    else:
        cfg = {"kernel": "auto"}
        monkeypatch.setattr(cost, "model_for", lambda dev: model)
    rt, events, drafts, logits = _drafts(cfg, device, greedy)
    assert events == [], f"host reads of device data: {events}"
    want = "dense" if model is DENSE_ONLY else "union"
    assert rt.head.path_steps[want] == 2 and sum(rt.head.path_steps.values()) == 2
    tot = rt.stats.totals  # the same counts reach the statistics (JSON totals, /metrics), once per step
    assert tot[f"path_{want}"] == 2 and sum(tot[f"path_{p}"] for p in ("per_request", "union", "dense")) == 2
    if want == "union":  # exact: the same drafts and the same pruned distributions
        for a, b in zip(drafts, ref_drafts, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    else:  # dense: every position handed back to vLLM's own head; the sparse head scored nothing
        assert tot["sparse_rows"] == 0 and tot["fallback"] == 0
        assert all(torch.isfinite(x).all() for x in logits)  # vLLM's head: the full vocabulary, nothing masked


def test_union_rows_are_gathered_once_per_step(monkeypatch) -> None:
    calls = []
    real = head_mod.prepare_union
    monkeypatch.setattr(head_mod, "prepare_union", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    rt, *_ = _drafts({"kernel": "union"}, "cpu", True, steps=3)
    assert len(calls) == 3  # 3 steps x 2 draft positions, one gather per step
    assert rt.head._plan is None  # the last step's context is gone, and its plan with it


def test_auto_probes_the_union_only_when_it_could_pay(monkeypatch) -> None:
    calls = []
    real = head_mod.union_size
    monkeypatch.setattr(head_mod, "union_size", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(head_mod, "PROBE_EVERY", 2)
    monkeypatch.setattr(cost, "model_for", lambda dev: DENSE_ONLY)  # the union path can never win
    _drafts({"kernel": "auto"}, "cpu", True, steps=3)
    assert calls == []
    # the rule itself: due only when the union could win with the smallest union the sets allow (S / B), and then
    # every PROBE_EVERY-th time
    h = head_mod.SparseDraftHead.__new__(head_mod.SparseDraftHead)
    h._positions, h._probes = 1, 0
    close = cost.CostModel((0.0, 1.0), (1e12, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.5), "test")
    # S = 100,000 over 64 rows: smallest union 1,562 -> buffer 3,072: union 0.5 * 64 * 3,072 * 896 = 88.1M us
    # against per-request 100,000 * 896 = 89.6M us: the union could win
    assert [h._probe_due(close, 64, 896, 151_936, 100_000, 3072) for _ in range(4)] == [True, False, True, False]
    # with 40,000 ids (smallest union 625 -> buffer 1,536: 44.0M us) the per-request kernel (35.8M) wins: not measured
    assert not h._probe_due(close, 64, 896, 151_936, 40_000, 3072)
    assert not h._probe_due(DENSE_ONLY, 64, 896, 151_936, 100_000, 3072)


def test_auto_reads_the_lagged_sizes(monkeypatch) -> None:
    """``auto`` decides from the sizes of the steps before: the first step assumes full, disjoint sets; later
    steps use what was copied back (on CPU, the previous step's)."""
    seen = []
    real = cost.choose
    monkeypatch.setattr(cost, "model_for", lambda dev: UNION_ONLY)
    monkeypatch.setattr(cost, "choose", lambda m, z, n=None, **k: (seen.append((z, n)), real(m, z, n, **k))[1])
    _drafts({"kernel": "auto"}, "cpu", True, steps=3)
    (z1, n1), (z2, _), (z3, _) = seen
    assert (z1.batch, z1.sum_sets, z1.union) == (2, 2 * 64, 2 * 64) and n1 == 128  # no data yet: B x capacity
    assert z2.sum_sets < 2 * 64 and z2.union <= z2.sum_sets  # the real sizes of step 1
    assert z3.sum_sets >= z2.sum_sets  # the sets only grow
    assert z1.positions == 1


def test_lagged_size_scaling() -> None:
    h = head_mod.SparseDraftHead.__new__(head_mod.SparseDraftHead)
    h._lagged, h._union_share = (0, 0, 0), 1.0
    h._read_sizes(torch.tensor([8, 8000, 2000]), None)  # measured: a quarter of the sum
    h._read_sizes(torch.tensor([8, 12000, -1]), None)  # not measured: the last share of the new sum
    assert h._lagged == (8, 12000, 3000)
    h._lagged = (0, 0, 0)
    assert h.lagged_sizes(4, 100) == (400, 400)
    h._lagged = (8, 8000, 3000)
    assert h.lagged_sizes(8, 100) == (8000, 3000)
    assert h.lagged_sizes(16, 100) == (16000, 6000)  # more rows: sum and union scaled up
    assert h.lagged_sizes(2, 100) == (2000, 2000)  # fewer rows: the union is kept, at most the sum


def test_union_is_gathered_when_the_batch_is_frozen(monkeypatch) -> None:
    """prepare(): the union's rows are gathered in before_propose (on CUDA on a side stream, overlapping the
    drafter's first forward), not at the first draft position; the positions reuse that plan."""
    from types import SimpleNamespace as NS

    calls = []
    real = head_mod.prepare_union
    monkeypatch.setattr(head_mod, "prepare_union", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "kernel": "union"}, "cpu", w)
    rt.head.bind(proposer.model)
    _admit(r, rt, REQS)
    logits, sampled, hidden = _inputs("cpu")
    proposer._enable_probabilistic_draft_probs = False
    rt.begin_step()
    rt.on_verification_logits(logits)
    rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden, NS(query_start_loc_cpu=torch.tensor([0, 3, 5, 6])))
    assert calls == [1] and rt.head._plan is not None  # gathered before any draft position
    for pos in range(2):
        rt.draft(proposer, hidden[pos * 3: pos * 3 + 3], NS(all_greedy=True))
    assert calls == [1]
    rt.end_step()
    assert rt.stats.totals["path_union"] == 1 and rt.head.path_steps["union"] == 1


def test_handed_back_drafts_are_not_added_to_the_sets(monkeypatch) -> None:
    """A step the cost model gives to vLLM's head (dense): its drafts come from the full vocabulary, and adding
    them would make the next verification count accepted drafts as covered (as for guarded rows): not added."""
    from types import SimpleNamespace as NS

    monkeypatch.setattr(cost, "model_for", lambda dev: DENSE_ONLY)
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "kernel": "auto"}, "cpu", w)
    _admit(r, rt, REQS)
    logits, sampled, hidden = _inputs("cpu")
    rt.begin_step()
    rt.on_verification_logits(logits)
    rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden, NS(query_start_loc_cpu=torch.tensor([0, 3, 5, 6])))
    assert rt.draft(proposer, hidden[:3], NS(all_greedy=True)) is None  # handed back
    extended = []
    monkeypatch.setattr(rt.pool, "extend", lambda *a: extended.append(a))
    rt.after_propose(torch.tensor([[5, 6], [7, 8], [9, 10]]))
    assert extended == []
    rt.end_step()
    assert rt.stats.totals["path_dense"] == 1 and rt.stats.totals["sparse_rows"] == 0


def test_kernel_dense_hands_every_step_to_vllms_head() -> None:
    """``kernel: dense`` forces the dense path (benchmarks, and the TP hand-back e2e test): no cost model, no
    sparse scoring, the sets still kept; the path counted once per step."""
    from types import SimpleNamespace as NS

    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    r, rt, proposer = _runner({"target_topk": 2, "capacity": 64, "kernel": "dense"}, "cpu", w)
    assert rt.impl == "dense"
    _admit(r, rt, REQS)
    logits, sampled, hidden = _inputs("cpu")
    for _ in range(2):
        rt.begin_step()
        rt.on_verification_logits(logits)
        rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden,
                          NS(query_start_loc_cpu=torch.tensor([0, 3, 5, 6])))
        for pos in range(2):
            assert rt.draft(proposer, hidden[pos * 3: pos * 3 + 3], NS(all_greedy=True)) is None
        rt.after_propose(torch.tensor([[5, 6], [7, 8], [9, 10]]))
        rt.end_step()
    t = rt.stats.totals
    assert t["path_dense"] == 2 and t["path_per_request"] == t["path_union"] == 0 and t["sparse_rows"] == 0
    assert t["target"] > 0  # the sets are still kept and coverage counted


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_ranks_read_every_lagged_size(monkeypatch, tp: int) -> None:
    """With TP every rank must choose the same path (a handed-back step runs vLLM's collectives, not the sparse
    head's), so the head folds in every size copy issued so far, not whichever arrived: read(wait=True)."""
    from types import SimpleNamespace as NS

    monkeypatch.setattr(cost, "model_for", lambda dev: DENSE_ONLY)
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    r, rt, _ = _runner({"target_topk": 2, "capacity": 64, "kernel": "auto"}, "cpu", w)
    if tp > 1:  # the runtime built for a TP engine
        r.parallel_config.tensor_parallel_size = tp
        from nanospec_vllm.vllm.runtime import NanoSpecRuntime

        r._nanospec_runtime = None
        r._nanospec_checked = False
        rt = NanoSpecRuntime.maybe_create(r)
    waits = []
    real = rt.head._sizes.read
    monkeypatch.setattr(rt.head._sizes, "read", lambda wait, limit=None: (waits.append(wait), real(wait, limit))[1])
    _admit(r, rt, REQS)
    _, sampled, hidden = _inputs("cpu")
    rt.begin_step()
    rt.before_propose(r, sampled, NS(num_draft_tokens=[2, 1, 2]), hidden, NS(query_start_loc_cpu=torch.tensor([0, 3, 5, 6])))
    rt.end_step()
    assert waits == [tp > 1]
