"""Every sparse-head implementation against :func:`sparse_head_reference`, on random data and on cases built to
break a kernel: vocabularies that are not a multiple of any block (151,936) or are large (262,144), hidden sizes
that are not powers of two, empty / one-id / ragged sets, duplicates, padding inside the set, ids at ``V - 1`` and
past the head, exact ties, EAGLE-3 ``d2t`` heads, top-k and log-probabilities. Token ids must match exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanospec_vllm import ops
from nanospec_vllm.ops import native, triton_kernels
from nanospec_vllm.ops.reference import scores_reference, select, sparse_head_reference

pytestmark = pytest.mark.kernels

# fp32 accumulation order differs between implementations (SIMD lanes, tiles, BLAS blocking); weight and hidden
# are upcast exactly, so one tolerance covers bf16, fp16 and fp32 weights at these sizes (|score| <~ 100).
SCORE_TOL = {"atol": 2e-4, "rtol": 2e-5}
# log-softmax adds a logsumexp over up to C terms to the score error.
LOGPROB_TOL = {"atol": 5e-4, "rtol": 5e-5}
# The dense strategy scores in the weight's dtype (bf16 output of F.linear): ~3 significant digits.
DENSE_BF16_TOL = {"atol": 0.05, "rtol": 1e-2}

from .conftest import DEVICES, IMPLS
from .conftest import require_impl as _require


@dataclasses.dataclass
class Case:
    name: str
    vocab: int
    hidden: int
    counts: list[int]
    width: int
    dtype: torch.dtype = torch.bfloat16
    topk: int = 0
    logprobs: bool = False
    seed: int = 0
    id_dtype: torch.dtype = torch.int32
    d2t_rows: int = 0  # > 0: EAGLE-3 style reduced head of this many rows (row_index from d2t)
    edit: str = ""  # extra twist applied to the ids / weight, see _make

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("random-small-fp32", 1000, 64, [50, 17, 1], 50, torch.float32, topk=5, logprobs=True),
    Case("qwen-vocab-h96-bf16", 151_936, 96, [300, 1, 0, 157], 300, topk=4, logprobs=True),
    Case("vocab-262k-h64", 262_144, 64, [513, 200], 513, topk=3, edit="last-id"),
    Case("h97-fp16", 5003, 97, [129, 128, 127], 130, torch.float16, topk=8),
    Case("one-id", 151_936, 64, [1], 1, topk=3, logprobs=True, edit="last-id"),
    Case("empty-set", 151_936, 64, [0, 0], 16, topk=2, logprobs=True),
    Case("no-columns", 1000, 64, [0, 0], 0, topk=2, logprobs=True),
    Case("duplicates", 4096, 64, [64, 40], 64, topk=10, logprobs=True, edit="duplicates"),
    Case("padding-and-out-of-range", 2048, 64, [40, 40], 48, torch.float32, topk=6, logprobs=True,
         edit="holes"),
    Case("ties", 4096, 64, [96, 96, 30], 96, topk=6, logprobs=True, edit="ties"),
    Case("ragged-batch-int64", 151_936, 96, [700, 3, 0, 699, 350, 705], 700, torch.float32, topk=5,
         id_dtype=torch.int64),
    Case("d2t-head", 151_936, 64, [400, 120], 400, topk=5, logprobs=True, d2t_rows=32_000),
    Case("qwen-real-shape-bf16", 151_936, 896, [3072], 3072, topk=8),
]


def _make(case: Case, device: str):
    g = torch.Generator().manual_seed(case.seed)
    B, C, V, H = len(case.counts), case.width, case.vocab, case.hidden
    rows = case.d2t_rows or V
    if case.edit == "ties":  # small integers: every sum is exact in fp32, so equal rows give equal scores anywhere
        weight = torch.randint(-3, 4, (rows, H), generator=g).to(case.dtype)
        hidden = torch.randint(-2, 3, (B, H), generator=g).float()
    else:
        weight = torch.randn(rows, H, generator=g).to(case.dtype)
        hidden = torch.randn(B, H, generator=g)
    hidden = hidden.to(case.dtype if case.dtype != torch.float32 else torch.float32)
    ids = torch.full((B, C), -1, dtype=torch.int64)
    for b in range(B):
        ids[b] = torch.randperm(V, generator=g)[:C]
    row_index = None
    if case.d2t_rows:
        # target ids the draft head covers: a sorted random subset; half the active ids fall outside it
        covered = torch.randperm(V, generator=g)[:rows].sort().values
        d2t = covered - torch.arange(rows)
        row_index = ops.row_index_from_d2t(d2t, V)
        for b in range(B):
            n = C // 2
            ids[b, :n] = covered[torch.randperm(rows, generator=g)[:n]]
    if case.edit == "last-id":
        ids[:, 0] = V - 1
    elif case.edit == "duplicates":
        ids[:, 1::3] = ids[:, 0:1]  # the same id many times in a row
        ids[:, 2::5] = ids[:, 3:4]
    elif case.edit == "holes":
        ids[:, 5] = -1  # padding inside the valid prefix
        ids[:, 7] = V  # past the head: skipped
        ids[:, 9] = V + 12345
        ids[0, 11] = V - 1
    elif case.edit == "ties":
        # rows 0 and 1: several ids share the best row, scattered; the lowest id must win
        # The lowest tied id sits at column 67, after a larger tied id at column 3 in the same SIMD lane /
        # tile lane for every power-of-two block up to 64, so "first wins" or "last wins" both fail.
        cols = [67, 3, 10, 50, 77]
        for b in range(2):
            ids[b, cols] = ids[b, cols].sort().values
            tied = ids[b, cols]
            # identical rows that reach the largest score any row can (exactly representable values)
            weight[tied] = (hidden[b].float().sign() * 3).to(case.dtype)
        # row 2: every candidate has the same score (all-zero hidden)
        hidden[2] = 0
    for b, n in enumerate(case.counts):  # -1 past the count, like the slot pool
        ids[b, min(n, C):] = -1
    counts = torch.tensor(case.counts, dtype=torch.int32 if case.id_dtype == torch.int32 else torch.int64)
    ids = ids.to(case.id_dtype)
    to = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    return to(hidden), to(weight), to(ids), to(counts), (to(row_index) if row_index is not None else None)


def _assert_close_with_inf(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN (an output was not written)"
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: -inf pattern differs"
    assert torch.equal(actual[~fin], expected[~fin]), f"{what}: infinities differ"
    torch.testing.assert_close(actual[fin], expected[fin], **tol, msg=lambda m: f"{what}: {m}")


def _compare(out, ref, case_name: str) -> None:
    tok, best, tk_ids, tk_scores, lp = ref
    assert torch.equal(out.token_ids.cpu(), tok.cpu()), f"{case_name}: token ids {out.token_ids} != {tok}"
    assert out.token_ids.dtype == torch.int64
    _assert_close_with_inf(out.scores, best, SCORE_TOL, "best score")
    if tk_ids is None:
        assert out.topk_ids is None and out.topk_scores is None
    else:
        assert torch.equal(out.topk_ids.cpu(), tk_ids.cpu()), f"{case_name}: top-k ids differ"
        _assert_close_with_inf(out.topk_scores, tk_scores, SCORE_TOL, "top-k scores")
    if lp is None:
        assert out.logprobs is None
    else:
        _assert_close_with_inf(out.logprobs, lp, LOGPROB_TOL, "logprobs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_impl_matches_reference(case: Case, impl: str, device: str, poison) -> None:
    _require(impl, device)
    hidden, weight, ids, counts, row_index = _make(case, device)
    ref = sparse_head_reference(hidden, weight, ids, counts, row_index, case.topk, case.logprobs, case.vocab)
    out = ops.sparse_head(hidden, weight, ids, counts, row_index=row_index, topk=case.topk,
                          want_logprobs=case.logprobs, vocab_size=case.vocab, impl=impl)
    assert out.impl == impl
    _compare(out, ref, case.name)


def test_cases_hit_what_they_claim() -> None:
    """The edge cases really contain what their names say (guards the test data, not the kernels)."""
    by_name = {c.name: c for c in CASES}
    h, w, ids, counts, _ = _make(by_name["ties"], "cpu")
    s = scores_reference(h, w, ids, counts)
    for b in range(3):
        n_best = int((s[b] == s[b].max()).sum())
        assert n_best >= (5 if b < 2 else int(counts[b])), f"row {b}: only {n_best} tied candidates"
    tok, *_ = sparse_head_reference(h, w, ids, counts)
    assert tok[2] == ids[2, : int(counts[2])].min()  # all equal: the lowest id
    h, w, ids, counts, _ = _make(by_name["duplicates"], "cpu")
    assert all(len(set(r.tolist())) < len(r) for r in ids)
    _, _, ids, _, ri = _make(by_name["d2t-head"], "cpu")
    present = (ri[ids.long()] >= 0)
    assert present.any() and (~present).any()
    assert _make(by_name["vocab-262k-h64"], "cpu")[2][:, 0].eq(262_143).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "blocks", [{"block_c": 16, "block_h": 32, "num_splits": 5}, {"block_c": 8, "block_h": 16, "num_splits": 64},
               {"block_c": 32, "block_h": 128, "num_splits": 1}], ids=lambda d: "-".join(f"{v}" for v in d.values()))
@pytest.mark.parametrize("case", [
    Case("ragged-h97", 151_936, 97, [300, 5, 0, 299, 17, 33], 300, topk=4, logprobs=True, seed=3),
    next(c for c in CASES if c.name == "ties"),
], ids=str)
def test_triton_block_shapes(case: Case, blocks: dict, device: str, poison) -> None:
    """Many splits, many tiles per split, tiles past a row's count, a hidden size spanning partial blocks, and
    ties inside one program (lane-wise and across tiles) as well as across splits."""
    _require("triton", device)
    hidden, weight, ids, counts, _ = _make(case, device)
    ref = sparse_head_reference(hidden, weight, ids, counts, None, case.topk, case.logprobs, case.vocab)
    scores, tok, best = triton_kernels.sparse_head_triton(hidden, weight, ids, counts, None, **blocks)
    _, _, tk_ids, tk_scores, lp = select(scores, ids, case.topk, case.logprobs, case.vocab)
    _compare(ops.SparseHeadOutput(tok, best, tk_ids, tk_scores, lp), ref, case.name)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_strategy(device: str) -> None:
    """``dense_fallback_ratio``: full head in the weight's dtype, masked to the active set."""
    case = Case("dense", 151_936, 96, [400, 3, 0], 400, seed=5)
    hidden, weight, ids, counts, _ = _make(case, device)
    ref_tok, ref_best, *_ = sparse_head_reference(hidden, weight, ids, counts)
    out = ops.sparse_head(hidden, weight, ids, counts, topk=3, dense_fallback_ratio=0.0)
    assert out.impl == "dense"
    s32 = scores_reference(hidden, weight, ids, counts).cpu()
    for b in range(len(case.counts)):
        tok = int(out.token_ids[b])
        if case.counts[b] == 0:
            assert tok == -1 and out.scores[b] == float("-inf")
            assert out.topk_ids[b].eq(-1).all()
            continue
        active = ids[b, : case.counts[b]].cpu()
        assert tok in active.tolist()
        chosen32 = s32[b, : case.counts[b]][active == tok].max()
        torch.testing.assert_close(chosen32, ref_best[b].cpu(), **DENSE_BF16_TOL)
        torch.testing.assert_close(out.scores[b].cpu(), ref_best[b].cpu(), **DENSE_BF16_TOL)
        assert set(out.topk_ids[b].tolist()) <= set(active.tolist())
    # below the ratio: a kernel runs, not the dense head
    small = ops.sparse_head(hidden, weight, ids, counts, dense_fallback_ratio=1.0, impl="torch")
    assert small.impl == "torch" and torch.equal(small.token_ids, ref_tok)


def test_resolve_impl_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown sparse head implementation 'cutlass'"):
        ops.resolve_impl("cutlass", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'triton' is not available on cpu"):
        ops.resolve_impl("triton", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'native' is not available on cuda"):
            ops.resolve_impl("native", "cuda")
    with pytest.raises(ValueError, match="hidden \\[B, H\\] and weight \\[V, H\\] expected"):
        ops.sparse_head(torch.zeros(2, 8), torch.zeros(10, 9), torch.zeros(2, 3, dtype=torch.int32),
                        torch.zeros(2, dtype=torch.int32))


def test_auto_on_cpu(monkeypatch, caplog) -> None:
    """``auto`` picks native on CPU when built; otherwise torch, with one warning and a counted fallback."""
    expected = "native" if native.is_available() else "torch"
    assert ops.resolve_impl("auto", "cpu") == expected
    monkeypatch.setattr(native, "is_available", lambda: False)
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "fallback_counts", {})
    caplog.clear()  # the first call above warns too where the extension is not built
    with caplog.at_level("WARNING", logger="nanospec_vllm.ops"):
        assert ops.resolve_impl("auto", "cpu") == "torch"
        assert ops.resolve_impl("auto", "cpu") == "torch"
    assert sum("native CPU kernel not built" in r.getMessage() for r in caplog.records) == 1
    assert ops.fallback_counts["native_unavailable"] == 2


def test_native_reports_build_state() -> None:
    if native.is_available():
        assert native.build_error() == "" and native.isa() in ("avx512", "avx2", "scalar")
    else:
        assert native.build_error()
