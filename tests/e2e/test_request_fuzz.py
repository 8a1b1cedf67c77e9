"""Bad input over HTTP: hypothesis-generated OpenAI requests against the shared ``nanospec serve`` (``conftest.py``).

Each request (completions or chat, 4 tokens) carries random ``vllm_xargs`` (the ``nanospec`` switch as any
JSON-like value, sometimes extra keys, sometimes not an object at all) and random ``temperature``, ``top_p``,
``top_k``, ``seed`` and ``n`` (valid, out of range, wrong type, NaN/inf, integers beyond 64 bits). Properties:
the answer is 200 (with ``n`` choices) or 400, never a 500 or a dropped connection; a 400 names a field the request
set; afterwards the server is healthy, answers a normal request and holds no NanoSpec slot. Derandomized, so every
run sends the same requests. Top-k-only random sampling, which crashed vLLM's worker under speculative decoding
(``patch_topk_sampler`` in the patch register), is always among them (an explicit example) and must now be a 200.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import requests
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

EXAMPLES = 40
PROMPT = "def add(a, b):"

_scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from(["1", "0", "true", "False", " on ", "YES", "no", "off", "maybe", "", "2"])
            | st.text(max_size=8))
_json_like = st.recursive(_scalars, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=4), k,
                                                                                          max_size=2),
                          max_leaves=5)
_xargs = st.one_of(
    st.builds(lambda v: {"nanospec": v}, _json_like),
    st.builds(lambda v, extra: {**extra, "nanospec": v}, _json_like,
              st.dictionaries(st.sampled_from(["foo", "nanospec_x", "k"]), _scalars, max_size=2)),
    _json_like,  # not an object at all
)
_fields = {
    "vllm_xargs": _xargs,
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-9, 1e9, float("nan"), float("inf"), "hot", None]),
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 1e-9, float("nan"), "all", None]),
    "top_k": st.integers(-3, 200_000) | st.sampled_from([0, -1, 1, 151_936, 2**31, 2**63, 2.5, "k", None]),
    "seed": st.integers(-(2**65), 2**65) | st.sampled_from([0, -1, 2**63, 2**64, "s", 1.5, None]),
    "n": st.sampled_from([-1, 0, 1, 2, 3, "2", 1.5, None]),
}
_requests = st.tuples(st.sampled_from(["completions", "chat"]),
                      st.fixed_dictionaries({}, optional=_fields))  # type: ignore[arg-type]

SEEN: Counter[str] = Counter()


def _names_a_field(message: str, body: dict[str, Any]) -> bool:
    names = set(body) | ({"nanospec", "extra_args"} if "vllm_xargs" in body else set())
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _valid_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _send(server, endpoint: str, fields: dict[str, Any]) -> requests.Response:
    body: dict[str, Any] = {"model": server.model, "max_tokens": 4, **fields}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    # NaN/inf are sent as the bare tokens NaN/Infinity (what Python's json module and many clients write)
    return requests.post(f"{server.base}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                         data=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"},
                         timeout=120)


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=timedelta(seconds=90),
          phases=(Phase.explicit, Phase.generate), print_blob=True)
@given(_requests)
@example(("completions", {"top_k": 403}))  # random sampling, top-k only: killed vLLM's worker before the patch
@example(("chat", {"top_k": 5, "temperature": 0.7, "vllm_xargs": {"nanospec": False}}))
def test_random_requests_are_200_or_400_naming_the_field(server, req):
    endpoint, fields = req
    r = _send(server, endpoint, fields)
    SEEN[str(r.status_code)] += 1
    assert r.status_code in (200, 400), f"{endpoint} {fields!r} -> {r.status_code}: {r.text[:500]}"
    if r.status_code == 400:
        msg = r.json()["error"]["message"]
        assert _names_a_field(msg, fields), f"{fields!r}: 400 does not name a field it set: {msg[:300]}"
        SEEN["400:" + (",".join(sorted(n for n in fields if re.search(rf"\b{n}\b", msg))) or "?")] += 1
    else:
        n = fields.get("n")
        want = int(n) if isinstance(n, (int, str)) and str(n).isdigit() else 1  # "2": pydantic's lax int
        choices = r.json()["choices"]
        assert len(choices) == want, (fields, len(choices))
        for c in choices:
            text = c["text"] if endpoint == "completions" else c["message"]["content"]
            assert isinstance(text, str)


def test_server_healthy_after_fuzzing(server):
    """After the generated requests: /health, a normal greedy request equal with and without NanoSpec, no slot
    left behind (runs after the fuzz test: tests run in file order)."""
    assert server.healthy()
    on = server.complete(PROMPT, max_tokens=16)
    off = server.complete(PROMPT, max_tokens=16, vllm_xargs={"nanospec": 0})
    assert on.status_code == 200 and off.status_code == 200, (on.text, off.text)
    assert on.json()["choices"][0]["text"] == off.json()["choices"][0]["text"]
    assert server.wait_slots(0) == 0
    print("fuzz results:", dict(SEEN))
    assert sum(SEEN[k] for k in ("200", "400")) >= EXAMPLES or not SEEN  # the fuzz test ran (when selected)


def test_nan_sampling_values_are_not_a_200_with_garbage(server):
    """NaN is the value most likely to pass range checks (every comparison is False): it must be refused."""
    for field in ("temperature", "top_p"):
        r = _send(server, "completions", {field: math.nan})
        assert r.status_code == 400, (field, r.status_code, r.text[:300])
