"""The opt-in debug recorder (``NANOSPEC_DEBUG_RECORD=1``) on a fake model runner: off by default (``rt.debug is
None``); when on, it attributes seeds, emitted tokens, the target's top-k (through vLLM-style ``SpecDecodeMetadata``
logits indices) and drafts to the right request, and every id of each request's active set is among its sources.
The hand-worked batch is the one of ``test_runtime_fake.py``."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import torch

from nanospec_vllm.config import parse_config
from nanospec_vllm.vllm.debug import ENV
from nanospec_vllm.vllm.runtime import NanoSpecRuntime

V = 1000


def _runner(monkeypatch, record: bool):
    if record:
        monkeypatch.setenv(ENV, "1")
    else:
        monkeypatch.delenv(ENV, raising=False)
    r = NS(
        speculative_config=NS(method="draft_model", use_heterogeneous_vocab=False),
        parallel_config=NS(tensor_parallel_size=1), device="cpu",
        model_config=NS(get_vocab_size=lambda: V, hf_config=NS(eos_token_id=999), tokenizer="/nonexistent",
                        trust_remote_code=False),
        scheduler_config=NS(max_num_seqs=4), requests={},
        input_batch=NS(num_reqs=0, req_ids=[], num_computed_tokens_cpu=np.zeros(4, dtype=np.int64),
                       num_prompt_tokens=np.zeros(4, dtype=np.int64)),
        discard_request_mask=NS(np=np.zeros(4, dtype=bool)),
    )
    cfg = parse_config({"always_active_special_ids": False, "kernel": "torch", "target_topk": 2, "capacity": 64,
                        "always_active_ids": [998]})
    return r, NanoSpecRuntime(r, cfg)


def _step(r, rt):
    reqs = {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")}
    for rid, (prompt, switch) in reqs.items():
        r.requests[rid] = NS(prompt_token_ids=prompt, output_token_ids=[],
                             sampling_params=NS(extra_args=None if switch is None else {"nanospec": switch},
                                                all_stop_token_ids=[]))
    so = NS(finished_req_ids=[], preempted_req_ids=[], scheduled_new_reqs=[NS(req_id=x) for x in reqs],
            scheduled_cached_reqs=NS(resumed_req_ids=[]))
    rt.release(so)
    rt.admit_scheduled(r, so)
    r.input_batch.req_ids, r.input_batch.num_reqs = list(reqs), 3
    logits = torch.zeros(8, V)
    for row, (t1, t2) in enumerate([(40, 41), (42, 43), (44, 45), (50, 51), (52, 53), (60, 61), (62, 63),
                                    (64, 65)]):
        logits[row, t1], logits[row, t2] = 2.0, 1.0
    # vLLM's layout: a drafted 2 (target rows 0, 1, bonus 2), b 1 (3; 4), c 2 (5, 6; 7)
    meta = NS(num_draft_tokens=[2, 1, 2], cu_num_draft_tokens=torch.tensor([2, 3, 5]),
              target_logits_indices=torch.tensor([0, 1, 3, 5, 6]), bonus_logits_indices=torch.tensor([2, 4, 7]))
    rt.begin_step()
    rt.on_verification_logits(logits)
    rt.before_propose(r, torch.tensor([[2, 7, -1], [4, -1, -1], [6, 8, 9]]), meta)
    rt.after_propose(torch.tensor([[70, 71], [72, 73], [74, 75]]))
    rt.end_step()
    rt.release(NS(finished_req_ids=["a", "b", "c"], preempted_req_ids=[]))  # snapshot, then free


def test_off_by_default(monkeypatch):
    r, rt = _runner(monkeypatch, record=False)
    assert rt.debug is None
    _step(r, rt)  # the hooks are skipped
    assert rt.pool.num_in_use == 0


def test_records_each_request_sources_and_sets(monkeypatch):
    r, rt = _runner(monkeypatch, record=True)
    _step(r, rt)
    st = rt.debug.state()
    assert st["pinned"] == [998]
    a, c = st["sources"]["a"], st["sources"]["c"]
    assert a["seed"] == [1, 2, 3] and c["seed"] == [6]
    assert a["emitted"] == [2, 7] and c["emitted"] == [6, 8, 9]
    assert a["topk"] == [40, 41, 42, 43, 44, 45]  # every row of a (a superset of the verified ones)
    assert c["topk"] == [60, 61, 62, 63, 64, 65]
    assert a["draft"] == [70, 71] and c["draft"] == [74, 75]
    assert "b" not in st["active"]  # switched off: no slot, no set
    # what the pool held (read at release): hand-worked in test_runtime_fake, plus the drafts and the pinned id
    assert st["active"]["a"] == sorted({998, 1, 2, 3, 7, 40, 41, 42, 43, 70, 71})
    assert st["active"]["c"] == sorted({998, 6, 8, 9, 60, 61, 62, 63, 64, 65, 74, 75})
    for rid in ("a", "c"):
        mine = set(st["pinned"]).union(*map(set, st["sources"][rid].values()))
        assert set(st["active"][rid]) <= mine
