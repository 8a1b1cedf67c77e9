"""`nanospec serve` end to end: YAML --speculative-config, OpenAI completions and chat with the per-request switch,
the HTTP 400 for a bad switch value, /metrics present and moving, preemption and an aborted stream releasing
their slots. The server (the 0.5B drafting for itself, a KV cache small enough that concurrent long requests are
preempted) is the session's shared ``server`` fixture (``conftest.py``).
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from nanospec_vllm.tools.server import metric

pytestmark = pytest.mark.e2e


PROMPT = "Write a Python function that checks whether a string is a palindrome."


def test_completions_switch_on_off_identical(server):
    on = server.complete(PROMPT)
    off = server.complete(PROMPT, vllm_xargs={"nanospec": 0})
    assert on.status_code == 200 and off.status_code == 200, (on.text, off.text)
    t_on, t_off = on.json()["choices"][0]["text"], off.json()["choices"][0]["text"]
    assert t_on == t_off and len(t_on) > 20


def test_chat_switch_on_off_identical(server):
    on = server.chat(PROMPT)
    off = server.chat(PROMPT, vllm_xargs={"nanospec": "false"})
    assert on.status_code == 200 and off.status_code == 200, (on.text, off.text)
    assert on.json()["choices"][0]["message"]["content"] == off.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("bad", ["maybe", 2, [1]])
def test_bad_switch_is_400_naming_the_field(server, bad):
    r = server.complete(PROMPT, vllm_xargs={"nanospec": bad})
    assert r.status_code == 400, r.text
    assert "nanospec" in r.json()["error"]["message"]
    r = server.chat(PROMPT, vllm_xargs={"nanospec": bad}, stream=True)
    assert r.status_code == 400, r.text


def test_metrics_present_and_moving(server):
    before = server.metrics()
    for name in ("nanospec_slots_in_use", "nanospec_target_tokens_total", "nanospec_target_tokens_covered_total",
                 "nanospec_kernel",
                 "nanospec_active_vocab_size_count"):
        metric(before, name)  # present
    r = server.complete("def quicksort(xs):", max_tokens=64)
    assert r.status_code == 200
    time.sleep(1)
    after = server.metrics()
    assert metric(after, "nanospec_target_tokens_total") > metric(before, "nanospec_target_tokens_total")
    assert metric(after, "nanospec_active_vocab_size_count") > metric(before, "nanospec_active_vocab_size_count")
    assert metric(after, "nanospec_target_tokens_covered_total") <= metric(after, "nanospec_target_tokens_total")
    assert 'nanospec_kernel{impl="native"} 1.0' in after  # make install builds the native CPU kernel
    assert server.wait_slots(0) == 0


def test_preemption_releases_slots(server):
    pre0 = metric(server.metrics(), "vllm:num_preemptions_total")
    results: list[requests.Response] = []

    def one(i: int) -> None:
        results.append(server.complete(f"Count from {i} to 400, one number per line:\n", max_tokens=220,
                                       ignore_eos=True))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == 6 and all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
    assert all(r.json()["usage"]["completion_tokens"] == 220 for r in results)
    assert metric(server.metrics(), "vllm:num_preemptions_total") > pre0, "the KV cache should force preemption"
    assert server.wait_slots(0) == 0


def test_aborted_stream_releases_slot(server):
    body = {"model": server.model, "prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with requests.post(server.base + "/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                chunks += 1
            if chunks >= 5:
                break
        assert metric(server.metrics(), "nanospec_slots_in_use") >= 1
    # connection closed mid-stream: vLLM aborts the request; its slot must come back
    assert server.wait_slots(0) == 0


def test_log_line_reports_nanospec(server):
    server.complete("def merge_sort(xs):", max_tokens=32)
    deadline = time.time() + 20
    while time.time() < deadline:
        text = server.log.read_text()
        if re.search(r"NanoSpec metrics: mean active vocab \d+ ids, coverage", text):
            break
        time.sleep(1)
    text = server.log.read_text()
    assert re.search(r"NanoSpec metrics: mean active vocab \d+ ids, coverage [\d.]+%", text)
    assert "SpecDecoding metrics" in text
