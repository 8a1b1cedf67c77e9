"""The worker runtime on a fake model runner: known drafts and emitted ids -> known coverage counts, set contents,
slots, and draft tokens. No vLLM, no model: every answer here is worked out by hand or by a plain dense argmax.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from nanospec_vllm.config import parse_config
from nanospec_vllm.vllm.runtime import NanoSpecRuntime

from .fakes import admit, fake_runner

V, H = 1000, 16


def _runner(cfg: dict):
    r = fake_runner(V)
    rt = NanoSpecRuntime(r, parse_config(dict({"always_active_special_ids": False, "kernel": "torch"}, **cfg)))
    return r, rt


_admit = admit


def test_switch_coverage_and_set_update() -> None:
    r, rt = _runner({"target_topk": 2, "capacity": 64})
    _admit(r, rt, {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")})
    assert rt.pool.slot_of("a") is not None and rt.pool.slot_of("c") is not None
    assert rt.pool.slot_of("b") is None, "a request that switched NanoSpec off must get no slot"
    # one verification step: a drafted 2 (emitted 2 = [2, 7]: the first draft accepted, the second replaced),
    # b drafted 1 (full head), c drafted 2 and all accepted (emitted 3 = [6, 8, 9])
    num_draft = [2, 1, 2]
    logits = torch.zeros(3 + 2 + 3, V)
    for row, (t1, t2) in enumerate([(40, 41), (42, 43), (44, 45), (50, 51), (52, 53), (60, 61), (62, 63),
                                    (64, 65)]):
        logits[row, t1], logits[row, t2] = 2.0, 1.0
    sampled = torch.tensor([[2, 7, -1], [4, -1, -1], [6, 8, 9]])
    rt.begin_step()
    rt.on_verification_logits(logits)
    rt.before_propose(r, sampled, NS(num_draft_tokens=num_draft))
    rt.end_step()
    tot = rt.stats.totals
    # drafted positions with an emitted token: a -> 2 (2, 7), c -> 2 (6, 8); b is off and not counted.
    # in the set when drafted: a: 2 yes (prompt), 7 no; c: 6 yes (prompt), 8 no -> 2 of 4
    assert (tot["target"], tot["covered"]) == (4, 2)
    a = set(rt.pool.active_list("a"))
    c = set(rt.pool.active_list("c"))
    # a: prompt + emitted [2, 7] + top-2 at its verified positions (logits rows 0, 1); row 2 was not reached
    assert a == {1, 2, 3, 7, 40, 41, 42, 43}
    # c: its logits rows start after a's 3 and b's 2: rows 5, 6, 7
    assert c == {6, 8, 9, 60, 61, 62, 63, 64, 65}
    assert not (a & {44, 45, 50, 51, 52, 53}) and not (c & {50, 51, 52, 53})  # never a neighbour's rows


def test_head_routes_rows_and_matches_dense_argmax() -> None:
    r, rt = _runner({"target_topk": 0, "capacity": 32})
    _admit(r, rt, {"a": ([10, 20, 30], None), "b": ([1], 0)})
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, H, generator=g)
    proposer = NS(model=NS(lm_head=NS(weight=w), logits_processor=NS(scale=1.0, soft_cap=None)),
                  _enable_probabilistic_draft_probs=False,
                  _greedy_sample=lambda h: (h.float() @ w.T).argmax(-1))
    rt.begin_step()
    rt.before_propose(r, torch.tensor([[-1], [-1]]), None)  # nothing emitted yet
    hidden = torch.randn(2, H, generator=g)
    tok, probs = rt.draft(proposer, hidden, NS(all_greedy=True))
    scores = hidden @ w.T
    want_a = [10, 20, 30][int(scores[0, [10, 20, 30]].argmax())]
    assert probs is None and tok.tolist() == [want_a, int(scores[1].argmax())]
    # a batch whose rows are not requests (parallel drafting): "not mine"
    assert rt.draft(proposer, torch.randn(5, H), NS(all_greedy=True)) is None
    assert rt.stats.no_step == 0
    rt.end_step()
    assert rt.draft(proposer, hidden, NS(all_greedy=True)) is None  # outside a step: not mine, and counted
    rt.before_propose(r, torch.tensor([[-1], [-1]]), None)
    assert rt.stats.no_step == 2
    rt.begin_step()
    assert rt.draft(proposer, hidden, NS(all_greedy=True)) is None  # a step, but no before_propose: counted
    rt.end_step()
    # counted: one sparse row (a; b is off) at the one position it drafted, one hand-back (parallel drafting),
    # three hooks without a step's draft batch
    assert (rt.stats.totals["sparse_rows"], rt.stats.totals["fallback"], rt.stats.totals["no_step"]) == (1, 1, 3)


def test_every_id_active_drafts_the_full_heads_tokens() -> None:
    """A policy that activates every id must draft exactly the dense head's tokens."""
    r, rt = _runner({"target_topk": 0, "capacity": V + 1, "always_active_ids": list(range(V))})
    _admit(r, rt, {"a": ([5], None), "b": ([6], None)})
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, H, generator=g)
    proposer = NS(model=NS(lm_head=NS(weight=w), logits_processor=NS(scale=1.0, soft_cap=None)),
                  _enable_probabilistic_draft_probs=False, _greedy_sample=None)
    rt.begin_step()
    rt.before_propose(r, torch.tensor([[-1], [-1]]), None)
    hidden = torch.randn(2, H, generator=g)
    tok, _ = rt.draft(proposer, hidden, NS(all_greedy=True))
    assert tok.tolist() == (hidden @ w.T).argmax(-1).tolist()


def test_pinned_ids_are_what_a_generation_needs() -> None:
    """EOS, pad and the chat template's markers are pinned; thousands of placeholder specials are not."""
    from nanospec_vllm.pinned import pinned_token_ids

    decoder = {i: NS(content=f"<|reserved_{i}|>", special=True) for i in range(5000, 11000)}
    decoder[100] = NS(content="<|im_start|>", special=True)
    decoder[101] = NS(content="<|im_end|>", special=True)
    decoder[102] = NS(content="<|fim_middle|>", special=True)  # special, but the template never writes it
    tok = NS(eos_token_id=101, pad_token_id=103, added_tokens_decoder=decoder,
             chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}")
    assert pinned_token_ids(NS(eos_token_id=[7, 101]), tok) == {7, 100, 101, 103}
    assert pinned_token_ids(NS(eos_token_id=7), None) == {7}


def test_too_many_pinned_ids_never_fail_start_up(monkeypatch) -> None:
    from nanospec_vllm.vllm import runtime as runtime_mod

    monkeypatch.setattr(runtime_mod, "pinned_token_ids", lambda cfg, tok: set(range(50)))
    runner, _ = _runner({"capacity": 8})
    rt = NanoSpecRuntime(runner, parse_config({"capacity": 8, "always_active_special_ids": True, "kernel": "torch"}))
    assert rt.pool.num_pinned == 4  # 50 generation ids, capacity 8: a warning, half the capacity pinned
