"""``nanospec_vllm.step`` against a plain-Python model of the same rules, written out position by position.

An off-by-one in the row / position arithmetic would not break losslessness (the target verifies every token), it
would quietly cost acceptance; these tests catch it.
"""

from __future__ import annotations

import random

import pytest
import torch

from nanospec_vllm.step import logits_starts, plan_batch, prompt_rows, verified_update


def model_update(sampled, num_draft, starts, topk):
    """Plain Python: (ids to add in order, drafted mask) per row."""
    out_ids, out_drafted = [], []
    for r, row in enumerate(sampled):
        W = len(row)
        nd = None if num_draft is None else num_draft[r]
        verified = [row[j] >= 0 and (j == 0 if nd is None else j <= nd) for j in range(W)]
        drafted = [nd is not None and row[j] >= 0 and j < nd for j in range(W)]
        ids = [row[j] if verified[j] else -1 for j in range(W)]
        if topk is not None:
            k = len(topk[0])
            for rank in range(k):
                for j in range(W):
                    lrow = min(max(starts[r] + j, 0), len(topk) - 1)
                    ids.append(topk[lrow][rank] if verified[j] else -1)
        out_ids.append(ids)
        out_drafted.append(drafted)
    return out_ids, out_drafted


def test_known_answer_two_requests() -> None:
    # request 0: 2 drafts, first accepted, second rejected -> emitted [11, 12], bonus position not reached
    # request 1: 3 drafts, all accepted -> emitted 4 tokens (3 drafted positions + bonus)
    sampled = torch.tensor([[11, 12, -1, -1], [21, 22, 23, 24]])
    num_draft = [2, 3]
    starts = logits_starts(num_draft, 2)
    assert starts == [0, 3]  # request 0 owns logits rows 0..2, request 1 rows 3..6
    topk = torch.arange(7 * 2).reshape(7, 2) + 100  # row r -> [100 + 2r, 101 + 2r]
    upd = verified_update(sampled, torch.tensor(num_draft), torch.tensor(starts), topk)
    assert upd.drafted.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert upd.new_ids[0].tolist() == [11, 12, -1, -1, 100, 102, -1, -1, 101, 103, -1, -1]
    assert upd.new_ids[1].tolist() == [21, 22, 23, 24, 106, 108, 110, 112, 107, 109, 111, 113]


def test_no_spec_metadata_uses_batch_rows() -> None:
    assert logits_starts(None, 3) == [0, 1, 2]
    sampled = torch.tensor([[5, -1], [6, -1]])
    topk = torch.tensor([[50, 51], [60, 61], [70, 71]])
    # rows 1 and 2 of a 3-request batch are NanoSpec rows
    upd = verified_update(sampled, None, torch.tensor([1, 2]), topk)
    assert upd.drafted.tolist() == [[False, False], [False, False]]
    assert upd.new_ids.tolist() == [[5, -1, 60, -1, 61, -1], [6, -1, 70, -1, 71, -1]]


@pytest.mark.parametrize("seed", range(20))
def test_matches_plain_python_model(seed: int) -> None:
    rng = random.Random(seed)
    B = rng.randint(1, 6)
    K = rng.randint(0, 4)
    W = K + 1
    num_draft_all = [rng.randint(0, K) for _ in range(B)]
    use_meta = rng.random() < 0.8
    starts_all = logits_starts(num_draft_all if use_meta else None, B)
    n_logits = (sum(n + 1 for n in num_draft_all) if use_meta else B)
    k = rng.randint(1, 5)
    topk = torch.randint(0, 1000, (n_logits, k))
    rows = sorted(rng.sample(range(B), rng.randint(1, B)))
    sampled = []
    for i in rows:
        nd = num_draft_all[i] if use_meta else 0
        acc = rng.randint(0, nd)  # accepted drafts; emitted = acc + 1 tokens
        sampled.append([rng.randint(0, 999) if j <= acc else -1 for j in range(W)])
    nd = [num_draft_all[i] for i in rows] if use_meta else None
    st = [starts_all[i] for i in rows]
    upd = verified_update(torch.tensor(sampled), None if nd is None else torch.tensor(nd), torch.tensor(st), topk)
    want_ids, want_drafted = model_update(sampled, nd, st, topk.tolist())
    assert upd.new_ids.tolist() == want_ids
    assert upd.drafted.tolist() == want_drafted
    # every verified position's top-k row lies inside its own request's logits rows (no neighbour's rows)
    for r, i in enumerate(rows):
        own = range(starts_all[i], starts_all[i] + ((num_draft_all[i] + 1) if use_meta else 1))
        for j, tok in enumerate(sampled[r]):
            if tok >= 0 and (not use_meta or j <= num_draft_all[i]):
                assert st[r] + j in own


def test_prompt_rows_chunked_prefill() -> None:
    # a 10-token prompt in chunks of 4: positions 0-3, 4-7, 8-9 (+ the final chunk samples position 9)
    assert prompt_rows(100, 104, 10, 0) == (100, 104)  # non-final chunk: all 4 positions
    assert prompt_rows(0, 4, 10, 4) == (0, 4)
    assert prompt_rows(7, 9, 10, 8) == (7, 8)  # final chunk: position 9 belongs to the verification
    assert prompt_rows(0, 10, 10, 0) == (0, 9)  # whole prompt at once
    assert prompt_rows(0, 1, 10, 10) == (0, 0)  # decode step: no prompt position
    assert prompt_rows(3, 4, 1, 0) == (3, 3)  # one-token prompt


def test_plan_batch() -> None:
    slots = {"a": 3, "c": 0}
    plan = plan_batch(["a", "b", "c"], slots.get)
    assert plan.slots == (3, -1, 0) and plan.on_rows == (0, 2) and plan.off_rows == (1,)
    assert plan.batch_size == 3
