"""Isolation on a real engine: one request's active set never holds ids that only another request produced.

Six requests whose vocabularies barely overlap (Chinese prose, Python code, digits only; two of each) run through
the 0.5B drafting for itself with NanoSpec, three at a time (``max_num_seqs=3``: one batch of three, and every
slot is reused by a second request). The worker's debug recorder (``NANOSPEC_DEBUG_RECORD=1``,
``nanospec_vllm/vllm/debug.py``) logs, per request, the ids the runtime added and why (seed = prompt + stop ids,
emitted tokens, the target's top-k at the request's logits rows, drafts), attributed with vLLM's own batch rows and
logits indices, and the request's active set over its life. The assertion: every id in request A's set is a pinned
id, or among A's recorded sources, or among A's output tokens; and the ids only another request produced are not
in it.
"""

from __future__ import annotations

import pytest

from .conftest import run_engine, worker_key

pytestmark = pytest.mark.e2e

PROMPTS = [
    "请用中文写一首关于春天和桃花的短诗，不要使用任何英文。",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n    # complete this function",
    "3141592653 5897932384 6264338327 9502884197 1693993751",
    "请用中文简单介绍一下长城的历史。",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):",
    "2718281828 4590452353 6028747135 2662497757 2470936999",
]


@pytest.fixture(scope="module")
def run(qwen05b, tmp_path_factory):
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3,
            # no hot set: its 512 ids (digits, common words) are pinned in every set and would hide what each
            # request's own sources put there
            "nanospec": {"capacity": 2048, "target_topk": 3, "hot_set_path": None}}
    job = {"model": str(qwen05b), "prompts": PROMPTS, "max_tokens": 32, "spec": spec, "max_num_seqs": 3,
           "max_model_len": 512, "env": {"NANOSPEC_DEBUG_RECORD": 1}}
    return run_engine(job, tmp_path_factory.mktemp("isolation"))


def _per_request(run) -> list[dict]:
    dbg = next(d for d in run["debug"] if d is not None)
    out = []
    for i, ext in enumerate(run["request_ids"]):
        rid = worker_key(dbg["active"], ext)
        src = dbg["sources"][rid]
        out.append({"active": set(dbg["active"][rid]), "sources": {k: set(v) for k, v in src.items()},
                    "own": set().union(*map(set, src.values())) | set(run["tokens"][i]),
                    "prompt": set(run["prompt_ids"][i])})
    return out


def test_recorder_saw_every_request(run):
    reqs = _per_request(run)
    assert len(reqs) == len(PROMPTS)
    for i, r in enumerate(reqs):
        # the recorder's attribution agrees with what the job itself sent and got back
        assert r["prompt"] <= r["sources"]["seed"], f"request {i}: seed is not its prompt"
        assert r["prompt"] <= r["active"], f"request {i}: its prompt ids are not all in its set"
        for why in ("emitted", "topk", "draft"):
            assert r["sources"].get(why), f"request {i}: nothing recorded as {why}"
        assert set(run["tokens"][i]) <= r["sources"]["emitted"], f"request {i}: output tokens not recorded"


def test_active_set_holds_only_own_ids(run):
    dbg = next(d for d in run["debug"] if d is not None)
    pinned = set(dbg["pinned"])
    reqs = _per_request(run)
    for i, r in enumerate(reqs):
        foreign = r["active"] - r["own"] - pinned
        if foreign:
            whose = {j: sorted(foreign & o["own"])[:10] for j, o in enumerate(reqs) if j != i and foreign & o["own"]}
            pytest.fail(f"request {i} holds {len(foreign)} ids from none of its sources: {sorted(foreign)[:20]}; "
                        f"found in other requests' sources: {whose}")


def test_disjoint_requests_do_not_share_their_own_ids(run):
    """The workload is really disjoint (each pair has ids only one side produced), and none of those ids crossed."""
    dbg = next(d for d in run["debug"] if d is not None)
    pinned = set(dbg["pinned"])
    reqs = _per_request(run)
    kinds = [0, 1, 2, 0, 1, 2]  # Chinese, code, digits
    for i, a in enumerate(reqs):
        for j, b in enumerate(reqs):
            if kinds[i] == kinds[j]:
                continue
            only_b = b["own"] - a["own"] - pinned
            assert len(only_b) >= 5, f"requests {i} and {j} barely differ: the test would prove nothing"
            assert not (a["active"] & only_b), f"request {i} holds ids only request {j} produced"
