"""The vocab-parallel sparse head (``nanospec_vllm.ops.tp``): shard row maps, the greedy (score, id) merge, and
agreement across ranks, against the single-device head on the full weight.

Ranks are simulated with threads sharing a barrier (every rank calls the real function, the collective is a
real exchange), and for real with two ``torch.distributed`` processes over gloo on 127.0.0.1. No vLLM engine.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from nanospec_vllm.ops import available_impls, sparse_head
from nanospec_vllm.ops.tp import (
    VocabShard,
    merge_greedy,
    shard_row_index,
    sparse_head_sharded,
    torch_all_gather,
)

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------- hand-worked answers
def test_merge_greedy_known_answers() -> None:
    scores = torch.tensor([[1.0, 5.0, NEG_INF, 2.0, 3.0],
                           [2.0, 5.0, NEG_INF, 2.0, 3.0]])
    ids = torch.tensor([[10, 70, -1, 90, 4],
                        [60, 20, -1, 30, 8]])
    tok, best = merge_greedy(scores, ids)
    assert tok.tolist() == [60, 20, -1, 30, 4]  # ties (cols 1, 3, 4) go to the lowest id, whichever rank holds it
    assert best.tolist() == [2.0, 5.0, NEG_INF, 2.0, 3.0]
    # rank order does not matter
    tok2, best2 = merge_greedy(scores.flip(0), ids.flip(0))
    assert torch.equal(tok, tok2) and torch.equal(best, best2)


def test_merge_greedy_ignores_rank_without_candidate() -> None:
    # a rank that found nothing reports (-inf, -1); an id of -1 never wins even with a finite score
    tok, best = merge_greedy(torch.tensor([[NEG_INF], [7.0], [9.0]]), torch.tensor([[-1], [3], [-1]]))
    assert tok.tolist() == [3] and best.tolist() == [7.0]


def test_merge_greedy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        merge_greedy(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.long))


def test_shard_row_index_known_answers() -> None:
    r0 = shard_row_index(10, VocabShard(0, 6, 0, 2))
    r1 = shard_row_index(10, VocabShard(6, 10, 1, 2))
    assert r0.tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1, -1]
    assert r1.tolist() == [-1, -1, -1, -1, -1, -1, 0, 1, 2, 3]
    assert r0.dtype == torch.int32
    # composed with a global target -> head-row map (EAGLE-3 d2t): head rows [0, 4) on rank 0, [4, 8) on rank 1
    glob = torch.tensor([-1, 0, 5, -1, 1, 7, 2, 4, 3, 6], dtype=torch.int32)
    assert shard_row_index(10, VocabShard(0, 4, 0, 2), glob).tolist() == [-1, 0, -1, -1, 1, -1, 2, -1, 3, -1]
    assert shard_row_index(10, VocabShard(4, 8, 1, 2), glob).tolist() == [-1, -1, 1, -1, -1, 3, -1, 0, -1, 2]
    with pytest.raises(ValueError):
        shard_row_index(10, VocabShard(0, 4, 0, 2), glob[:5])
    with pytest.raises(ValueError):
        VocabShard(5, 4, 0, 2)


# ---------------------------------------------------------------------------------------------- simulated ranks
def vllm_shards(vocab: int, world: int, pad_to: int = 64) -> list[VocabShard]:
    """vLLM's ParallelLMHead layout: the vocabulary padded to ``pad_to``, split evenly; the last rank may hold
    fewer real rows (its padding rows are never read)."""
    padded = -(-vocab // pad_to) * pad_to
    per = padded // world
    return [VocabShard(min(r * per, vocab), min((r + 1) * per, vocab), r, world) for r in range(world)]


def run_ranks(world: int, fn: Any) -> list[Any]:
    """Run ``fn(rank, all_gather)`` on ``world`` threads; ``all_gather`` is a real exchange between them."""
    barrier = threading.Barrier(world)
    slots: list[Any] = [None] * world
    out: list[Any] = [None] * world
    errors: list[BaseException] = []
    gathered_numel: list[int] = []

    def make(rank: int):
        def all_gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            g = torch.stack(slots)
            barrier.wait()
            gathered_numel.append(t.numel())
            return g
        return all_gather

    def body(rank: int) -> None:
        try:
            out[rank] = fn(rank, make(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    run_ranks.gathered_numel = gathered_numel  # type: ignore[attr-defined]
    return out


def random_case(seed: int, vocab: int = 1000, hidden: int = 48, batch: int = 5, width: int = 40,
                dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    h = torch.randn(batch, hidden, generator=g).to(dtype)
    # exact ties across shard boundaries: rows 3 and vocab-1 (row 0's best by far), and rows m, m+1 (m = vocab // 2)
    w[3] = (4 * h[0].float()).to(dtype)
    w[vocab - 1] = w[3]
    m = vocab // 2
    w[m + 1] = w[m]
    ids = torch.randint(0, vocab, (batch, width), generator=g)
    ids[0, :4] = torch.tensor([vocab - 1, 3, m + 1, m])
    ids[1, 5] = ids[1, 2]  # a duplicate
    ids[2, 7:] = -1  # padding
    counts = torch.randint(1, width + 1, (batch,), generator=g)
    counts[3] = 0  # a row with no candidate
    counts[0] = width
    return h, w, ids, counts


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharded_equals_single_device(world: int, seed: int) -> None:
    h, w, ids, counts = random_case(seed)
    vocab = w.shape[0]
    ref = sparse_head(h, w, ids, counts, topk=5, want_logprobs=True, vocab_size=vocab, impl="torch")
    shards = vllm_shards(vocab, world)

    def rank_fn(rank: int, ag: Any):
        s = shards[rank]
        local_w = w[s.start:s.end]
        ri = shard_row_index(vocab, s)
        greedy = sparse_head_sharded(h, local_w, ids, counts, row_index=ri, all_gather=ag, impl="torch")
        prob = sparse_head_sharded(h, local_w, ids, counts, row_index=ri, all_gather=ag, topk=5, want_logprobs=True,
                                   vocab_size=vocab, impl="torch")
        return greedy, prob

    outs = run_ranks(world, rank_fn)
    for greedy, prob in outs:
        assert torch.equal(greedy.token_ids, ref.token_ids)
        assert torch.equal(greedy.scores, ref.scores)
        assert torch.equal(prob.token_ids, ref.token_ids)
        assert torch.equal(prob.topk_ids, ref.topk_ids)
        assert torch.equal(prob.topk_scores, ref.topk_scores)
        assert torch.equal(prob.logprobs, ref.logprobs)
    assert ref.token_ids[0].item() == 3  # the cross-shard tie went to the lowest id
    assert ref.token_ids[3].item() == -1
    # nothing vocabulary-sized was exchanged: at most the [B, C] candidate scores
    assert max(run_ranks.gathered_numel) <= ids.numel()  # type: ignore[attr-defined]


@pytest.mark.parametrize("impl", [i for i in ("native", "torch") if i in available_impls("cpu")])
def test_sharded_with_d2t_and_dense_fallback(impl: str) -> None:
    # an EAGLE-3-like head: 300 head rows for a 1000-id target vocabulary, sharded over 2 ranks
    g = torch.Generator().manual_seed(7)
    vocab, rows = 1000, 300
    glob = torch.full((vocab,), -1, dtype=torch.int32)
    targets = torch.randperm(vocab, generator=g)[:rows].sort().values
    glob[targets] = torch.arange(rows, dtype=torch.int32)
    h, w, ids, counts = random_case(3, vocab=rows)
    ids = torch.where(ids >= 0, targets[ids.clamp(min=0)], ids)  # draft rows -> their target ids
    ids[4, :10] = torch.tensor([i for i in range(vocab) if glob[i] < 0][:10])  # ids the head cannot produce
    ref = sparse_head(h, w, ids, counts, row_index=glob, want_logprobs=True, vocab_size=vocab, impl="torch")
    shards = vllm_shards(rows, 2)

    def rank_fn(rank: int, ag: Any):
        s = shards[rank]
        ri = shard_row_index(vocab, s, glob)
        a = sparse_head_sharded(h, w[s.start:s.end], ids, counts, row_index=ri, all_gather=ag, impl=impl)
        b = sparse_head_sharded(h, w[s.start:s.end], ids, counts, row_index=ri, all_gather=ag, want_logprobs=True,
                                vocab_size=vocab, impl=impl)
        c = sparse_head_sharded(h, w[s.start:s.end], ids, counts, row_index=ri, all_gather=ag, impl=impl,
                                dense_fallback_ratio=0.0)  # always the dense-masked strategy
        return a, b, c

    for a, b, c in run_ranks(2, rank_fn):
        assert torch.equal(a.token_ids, ref.token_ids)
        assert torch.equal(b.token_ids, ref.token_ids)
        assert torch.allclose(b.logprobs, ref.logprobs, atol=1e-5, rtol=0, equal_nan=False)
        # dense: scores in the weight's dtype, so only the chosen ids are compared where the margin is clear
        assert c.impl == "dense"
        assert ((c.token_ids >= 0) == (ref.token_ids >= 0)).all()


def test_sharded_rejects_bad_shapes() -> None:
    h, w, ids, counts = random_case(0)
    with pytest.raises(ValueError):
        sparse_head_sharded(h, w, ids[:2], counts, row_index=shard_row_index(1000, VocabShard(0, 1000, 0, 1)),
                            all_gather=lambda t: t[None])


# ---------------------------------------------------------------------------------------------- two real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, out: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h, w, ids, counts = random_case(11, vocab=1500)  # every rank builds the same case from the same seed
        vocab = w.shape[0]
        s = vllm_shards(vocab, world)[rank]
        local_w = w[s.start:s.end].clone()  # this rank's shard only
        del w
        ri = shard_row_index(vocab, s)
        sizes: list[int] = []
        base = torch_all_gather()

        def ag(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return base(t)

        greedy = sparse_head_sharded(h, local_w, ids, counts, row_index=ri, all_gather=ag, impl="torch")
        prob = sparse_head_sharded(h, local_w, ids, counts, row_index=ri, all_gather=ag, want_logprobs=True,
                                   vocab_size=vocab, impl="torch")
        gen = torch.Generator().manual_seed(1234)  # the shared generator state (vLLM seeds every rank alike)
        probs = prob.logprobs.exp()
        live = probs.sum(1) > 0
        sampled = torch.full((ids.shape[0],), -1, dtype=torch.int64)
        sampled[live] = torch.multinomial(probs[live], 1, generator=gen).squeeze(1)
        out.put((rank, greedy.token_ids.tolist(), greedy.scores.tolist(), prob.logprobs, sampled.tolist(),
                 max(sizes), s.num_rows))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree_with_single_device() -> None:
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            r = q.get(timeout=120)
            results[r[0]] = r
    finally:
        for p in procs:
            p.join(60)
    assert all(p.exitcode == 0 for p in procs)

    h, w, ids, counts = random_case(11, vocab=1500)
    ref = sparse_head(h, w, ids, counts, want_logprobs=True, vocab_size=w.shape[0], impl="torch")
    gen = torch.Generator().manual_seed(1234)
    probs = ref.logprobs.exp()
    live = probs.sum(1) > 0
    expect = torch.full((ids.shape[0],), -1, dtype=torch.int64)
    expect[live] = torch.multinomial(probs[live], 1, generator=gen).squeeze(1)
    for rank in range(world):
        _, tok, best, logprobs, sampled, gathered, rows = results[rank]
        assert tok == ref.token_ids.tolist()
        assert best == ref.scores.tolist()
        assert torch.equal(logprobs, ref.logprobs)
        assert sampled == expect.tolist()  # same pruned distribution + same generator state -> same token
        assert gathered <= ids.numel() < rows  # only candidate scores travelled, never a vocabulary's worth


# ---------------------------------------------------------------------------------------------- vLLM head binding
def test_bind_head_reads_a_vocab_parallel_head() -> None:
    """``bind_head`` on a fake vLLM ``ParallelLMHead`` shard (rows padded to 64, like vLLM's): keeps the real rows
    of the rank, maps ids globally and locally, and its all-gather (the group's, ``dim=0``) merges exactly."""
    from types import SimpleNamespace as NS

    from nanospec_vllm.ops.binding import bind_head

    vocab, world = 1000, 2
    h, w, ids, counts = random_case(5, vocab=vocab)
    ref = sparse_head(h, w, ids, counts, want_logprobs=True, vocab_size=vocab, impl="torch")
    shards = vllm_shards(vocab, world)
    per = -(-vocab // 64) * 64 // world

    def rank_fn(rank: int, ag: Any):
        s = shards[rank]
        local = torch.zeros(per, w.shape[1], dtype=w.dtype)
        local[: s.num_rows] = w[s.start:s.end]
        local[s.num_rows:] = 100  # padding rows: must never be read
        group = NS(all_gather=lambda t, dim: ag(t.squeeze(0)) if dim == 0 else None)
        lm_head = NS(weight=local, org_vocab_size=vocab, tp_size=world, tp_rank=rank, parallel_group=group,
                     shard_indices=NS(org_vocab_start_index=s.start, org_vocab_end_index=s.end))
        b = bind_head(NS(lm_head=lm_head, logits_processor=NS(scale=1.0, soft_cap=None, org_vocab_size=vocab)), vocab)
        assert b.shard == s and b.weight.shape[0] == s.num_rows
        assert b.row_index is not None and b.row_index.tolist() == list(range(vocab))
        assert torch.equal(b.local_row_index, shard_row_index(vocab, s))
        g = sparse_head_sharded(h, b.weight, ids, counts, row_index=b.local_row_index, all_gather=b.all_gather,
                                impl="torch")
        p = sparse_head_sharded(h, b.weight, ids, counts, row_index=b.local_row_index, all_gather=b.all_gather,
                                want_logprobs=True, vocab_size=vocab, impl="torch")
        return g, p

    for g, p in run_ranks(world, rank_fn):
        assert torch.equal(g.token_ids, ref.token_ids) and torch.equal(g.scores, ref.scores)
        assert torch.equal(p.logprobs, ref.logprobs)


def test_bind_head_single_rank_unchanged() -> None:
    from types import SimpleNamespace as NS

    from nanospec_vllm.ops.binding import bind_head

    w = torch.randn(64, 8)
    b = bind_head(NS(lm_head=NS(weight=w, org_vocab_size=64, tp_size=1)), 64)
    assert b.shard is None and b.row_index is None and b.all_gather is None and b.weight.shape[0] == 64


def test_engine_check_accepts_tensor_parallel() -> None:
    from nanospec_vllm.config import NanoSpecConfigError, check_engine, check_tensor_parallel

    for tp in (1, 2, 8):
        check_tensor_parallel(tp)
        assert check_engine("draft_model", tp) == "draft_model"
    for bad in (0, -1):
        with pytest.raises(NanoSpecConfigError, match="tensor_parallel_size"):
            check_tensor_parallel(bad)


@pytest.mark.parametrize("method", ["synthetic", "fly"])
def test_engine_check_refuses_lossy_verification(method) -> None:
    """vLLM's ``synthetic`` and (0.33) ``fly`` verifiers change the output; NanoSpec's promise needs a lossless one."""
    from nanospec_vllm.config import NanoSpecConfigError, check_engine

    for ok in ("standard", "block"):
        assert check_engine("eagle", 1, False, ok) == "eagle"
    with pytest.raises(NanoSpecConfigError, match=f"rejection_sample_method '{method}'"):
        check_engine("eagle", 1, False, method)
