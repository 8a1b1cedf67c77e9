"""The opt-in debug recorder (``NANOSPEC_DEBUG_RECORD=1``) on a fake model runner: off by default (``rt.debug is
None``); when on, it attributes seeds, emitted tokens, the target's top-k (through vLLM-style ``SpecDecodeMetadata``
logits indices) and drafts to the right request, and every id of each request's active set is among its sources.
The hand-worked batch is the one of ``test_runtime_fake.py``."""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from nanospec_vllm.config import parse_config
from nanospec_vllm.vllm.debug import ENV
from nanospec_vllm.vllm.runtime import NanoSpecRuntime

from .fakes import admit, fake_runner

V = 1000


def _runner(monkeypatch, record: bool):
    if record:
        monkeypatch.setenv(ENV, "1")
    else:
        monkeypatch.delenv(ENV, raising=False)
    r = fake_runner(V)
    cfg = parse_config({"always_active_special_ids": False, "kernel": "torch", "target_topk": 2, "capacity": 64,
                        "always_active_ids": [998]})
    return r, NanoSpecRuntime(r, cfg)


def _step(r, rt):
    admit(r, rt, {"a": ([1, 2, 3], None), "b": ([4, 5], 0), "c": ([6], "on")})
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
    # in order, per drafting step, for every row (the off row b too: vLLM's head drafted it)
    assert st["drafts"] == {"a": [[70, 71]], "b": [[72, 73]], "c": [[74, 75]]}
    assert "b" not in st["active"]  # switched off: no slot, no set
    # what the pool held (read at release): hand-worked in test_runtime_fake, plus the drafts and the pinned id
    assert st["active"]["a"] == sorted({998, 1, 2, 3, 7, 40, 41, 42, 43, 70, 71})
    assert st["active"]["c"] == sorted({998, 6, 8, 9, 60, 61, 62, 63, 64, 65, 74, 75})
    for rid in ("a", "c"):
        mine = set(st["pinned"]).union(*map(set, st["sources"][rid].values()))
        assert set(st["active"][rid]) <= mine
