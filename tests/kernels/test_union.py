"""The union path (``nanospec_vllm.ops.union``) against :func:`sparse_head_reference`: every edge case of
``test_sparse_head`` (ties, empty sets, rows with count 0, duplicates, padding, ``d2t`` heads, top-k,
log-probabilities), a union larger than its buffer (finished by the per-request kernel on the device), one plan
reused at several draft positions, hand-worked union sizes, and the vocab-parallel shards of ``ops.tp``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from nanospec_vllm import ops
from nanospec_vllm.ops import native
from nanospec_vllm.ops.reference import sparse_head_reference
from nanospec_vllm.ops.tp import VocabShard, shard_row_index, sparse_head_sharded
from nanospec_vllm.ops.union import default_capacity, prepare_union, union_raw, union_size

from .conftest import DEVICES
from .test_sparse_head import CASES, Case, _compare, _make

pytestmark = pytest.mark.kernels

# the 896-hidden, 3,072-id case is the slowest here and adds nothing the others do not cover
UNION_CASES = [c for c in CASES if c.name != "qwen-real-shape-bf16"]
OVERFLOW_IMPLS = ["torch"] + (["native"] if native.is_available() else [])


def _ref(case: Case, hidden, weight, ids, counts, row_index):
    return sparse_head_reference(hidden, weight, ids, counts, row_index, case.topk, case.logprobs, case.vocab)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", UNION_CASES, ids=str)
def test_union_matches_reference(case: Case, device: str, poison) -> None:
    hidden, weight, ids, counts, row_index = _make(case, device)
    out = ops.sparse_head(hidden, weight, ids, counts, row_index=row_index, topk=case.topk,
                          want_logprobs=case.logprobs, vocab_size=case.vocab, impl="union")
    assert out.impl == "union"
    _compare(out, _ref(case, hidden, weight, ids, counts, row_index), case.name)


@pytest.mark.parametrize("overflow_impl", OVERFLOW_IMPLS)
@pytest.mark.parametrize("case", [c for c in UNION_CASES if c.name in (
    "random-small-fp32", "ties", "duplicates", "d2t-head", "ragged-batch-int64", "padding-and-out-of-range")],
    ids=str)
def test_union_overflow_is_exact(case: Case, overflow_impl: str, poison) -> None:
    """A buffer smaller than the union: the rows past it are scored by the per-request kernel, merged on the
    device; the answer is unchanged."""
    hidden, weight, ids, counts, row_index = _make(case, "cpu")
    n = int(union_size(ids, counts, weight.shape[0], row_index))
    assert n > 3
    for cap in (1, n // 2, n - 1):
        plan = prepare_union(weight, ids, counts, row_index, capacity=cap)
        assert plan.may_overflow and plan.capacity == cap
        assert int(plan.size) == n
        assert bool((plan.valid & ~plan.fits).any())  # some candidates really take the overflow pass
        scores, tok, best = union_raw(hidden, plan, weight, ids, counts, row_index, overflow_impl)
        _, _, tk_ids, tk_scores, lp = ops.select(scores, ids, case.topk, case.logprobs, case.vocab)
        _compare(ops.SparseHeadOutput(tok, best, tk_ids, tk_scores, lp),
                 _ref(case, hidden, weight, ids, counts, row_index), f"{case.name} capacity={cap}")


def test_plan_reused_across_positions() -> None:
    """One plan (the sets of a step), three draft positions (new hidden states each): each equals the reference,
    and the plan's buffers come from the caller's workspace."""
    case = next(c for c in CASES if c.name == "ragged-batch-int64")
    _, weight, ids, counts, _ = _make(case, "cpu")
    ws: dict = {}
    plan = ops.prepare_union(weight, ids, counts, workspace=ws)
    assert plan.weight_rows.data_ptr() in {t.data_ptr() for t in ws.values()}
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        h = torch.randn(ids.shape[0], weight.shape[1], generator=g)
        out = ops.sparse_head(h, weight, ids, counts, topk=3, want_logprobs=True, vocab_size=case.vocab,
                              union_plan=plan, impl="native" if native.is_available() else "torch")
        assert out.impl == "union"
        _compare(out, sparse_head_reference(h, weight, ids, counts, None, 3, True, case.vocab), "reuse")


def test_union_size_known_answers() -> None:
    ids = torch.tensor([[5, 3, 5, -1, 9], [3, 7, 0, 2, 2], [1, 1, 1, 1, 1]])
    counts = torch.tensor([4, 3, 0])  # row 0: 5, 3, 5, (pad); row 1: 3, 7, 0; row 2: nothing
    assert int(union_size(ids, counts, 10)) == 4  # {0, 3, 5, 7}
    assert int(union_size(ids, counts, 6)) == 3  # 7 is past a 6-row head: {0, 3, 5}
    ri = torch.tensor([-1, -1, -1, 1, -1, 1, -1, 0, -1, -1], dtype=torch.int32)  # 3 and 5 share head row 1
    assert int(union_size(ids, counts, 2, ri)) == 2  # head rows {0, 1}
    plan = prepare_union(torch.zeros(10, 4), ids, counts)
    assert plan.rows[:4].tolist() == [0, 3, 5, 7]  # increasing head rows
    assert plan.col[0, :3].tolist() == [2, 1, 2] and plan.col[1, :3].tolist() == [1, 3, 0]
    assert plan.fits.tolist() == [[True, True, True, False, False], [True, True, True, False, False],
                                  [False] * 5]
    assert not plan.may_overflow and plan.capacity == default_capacity(3, 5, 10) == 10


@pytest.mark.parametrize("device", DEVICES)
def test_both_compactions_agree(device: str) -> None:
    """``nonzero_static`` (CPU) and the cumulative-sum scatter (other devices) give the same padded rows."""
    from nanospec_vllm.ops.union import _compact

    g = torch.Generator().manual_seed(0)
    for density in (0.0, 0.01, 0.3, 1.0):
        mark = (torch.rand(5000, generator=g) < density).to(device)
        n = int(mark.sum())
        for cap in (1, 7, max(1, n // 2), n + 5, 5000):
            a, b = _compact(mark, cap, scatter=False), _compact(mark, cap, scatter=True)
            expect = torch.nonzero(mark).reshape(-1)[:cap].tolist()
            expect += [5000] * (cap - len(expect))
            assert a.tolist() == b.tolist() == expect, (density, cap)


def test_union_all_empty_and_no_columns() -> None:
    for width in (0, 6):
        ids = torch.full((3, width), -1)
        counts = torch.zeros(3, dtype=torch.int64)
        w, h = torch.randn(50, 8), torch.randn(3, 8)
        out = ops.sparse_head(h, w, ids, counts, topk=2, want_logprobs=True, vocab_size=50, impl="union")
        assert out.token_ids.tolist() == [-1, -1, -1]
        assert torch.isneginf(out.logprobs).all()


def _random_with_ties(seed: int, vocab: int = 700, hidden: int = 32, batch: int = 6, width: int = 60):
    """Random sets that overlap (a shared block of ids, like a hot set) and exact ties: small integer weights
    make every sum exact in fp32, and rows 0-1 hold several ids with the same best row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (vocab, hidden), generator=g).float()
    h = torch.randint(-2, 3, (batch, hidden), generator=g).float()
    shared = torch.randperm(vocab, generator=g)[:20]
    ids = torch.stack([torch.cat([shared, torch.randperm(vocab, generator=g)[: width - 20]]) for _ in range(batch)])
    for b in range(2):
        tied = ids[b, [40, 2, 33]]
        w[tied] = h[b].sign() * 3
    counts = torch.randint(0, width + 1, (batch,), generator=g)
    counts[0] = counts[1] = width
    return h, w, ids, counts


@pytest.mark.parametrize("seed", range(4))
def test_random_overlapping_sets_with_ties(seed: int) -> None:
    h, w, ids, counts = _random_with_ties(seed)
    ref = sparse_head_reference(h, w, ids, counts, None, 5, True, w.shape[0])
    out = ops.sparse_head(h, w, ids, counts, topk=5, want_logprobs=True, vocab_size=w.shape[0], impl="union")
    _compare(out, ref, f"seed {seed}")
    for b in range(2):  # the tie really is there, and went to the lowest tied id
        tied = ids[b, [40, 2, 33]]
        assert out.token_ids[b].item() == tied.min().item()
    assert int(union_size(ids, counts, w.shape[0])) < int(counts.sum())  # the sets overlap


def _run_ranks(world: int, fn):
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    out: list = [None] * world
    errors: list = []

    def make(rank: int):
        def all_gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            g = torch.stack(slots)
            barrier.wait()
            return g
        return all_gather

    def body(rank: int) -> None:
        try:
            out[rank] = fn(rank, make(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("d2t", [False, True])
def test_union_on_vocab_shards(d2t: bool) -> None:
    """Each rank forms the union of its own shard's rows; greedy and probabilistic answers equal the single
    device's (a cross-shard tie included), with and without an EAGLE-3-like target -> head-row map."""
    h, w, ids, counts = _random_with_ties(5, vocab=400)
    vocab = w.shape[0]
    glob = None
    if d2t:  # a 300-row head for the 400-id vocabulary
        g = torch.Generator().manual_seed(3)
        targets = torch.randperm(vocab, generator=g)[:300].sort().values
        glob = torch.full((vocab,), -1, dtype=torch.int32)
        glob[targets] = torch.arange(300, dtype=torch.int32)
        w = w[:300]
    w[7] = w[w.shape[0] - 1] = h[0].sign() * 3  # a tie across the two shards
    head_rows = w.shape[0]
    tgt = (lambda r: int(targets[r])) if d2t else (lambda r: r)
    ids[0, :2] = torch.tensor([tgt(head_rows - 1), tgt(7)])
    ref = sparse_head_reference(h, w, ids, counts, glob, 4, True, vocab)
    half = head_rows // 2
    shards = [VocabShard(0, half, 0, 2), VocabShard(half, head_rows, 1, 2)]

    def rank_fn(rank: int, ag):
        s = shards[rank]
        ri = shard_row_index(vocab, s, glob)
        local = w[s.start:s.end]
        plan = prepare_union(local, ids, counts, ri)
        a = sparse_head_sharded(h, local, ids, counts, row_index=ri, all_gather=ag, impl="union")
        b = sparse_head_sharded(h, local, ids, counts, row_index=ri, all_gather=ag, topk=4, want_logprobs=True,
                                vocab_size=vocab, union_plan=plan)
        return a, b

    for a, b in _run_ranks(2, rank_fn):
        assert a.impl == b.impl == "union"
        assert torch.equal(a.token_ids, ref[0]) and torch.equal(b.token_ids, ref[0])
        assert a.token_ids[0].item() == min(tgt(7), tgt(head_rows - 1))
        assert torch.equal(b.topk_ids, ref[2])
        torch.testing.assert_close(b.logprobs, ref[4], atol=1e-5, rtol=0)
