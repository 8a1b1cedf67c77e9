"""`nanospec serve` end to end: YAML --speculative-config, OpenAI completions and chat with the per-request switch,
the HTTP 400 for a bad switch value, /metrics present and moving, preemption and an aborted stream releasing
their slots. One server (the 0.5B drafting for itself) is shared by every test in this file; its KV cache is made
small enough that concurrent long requests are preempted.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


class Server:
    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.model = str(model)
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOG_STATS_INTERVAL="2", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "nanospec_vllm.cli", "serve", self.model,
               "--speculative-config", str(ROOT / "configs" / "examples" / "cpu-self-draft.yaml"),
               "--port", str(self.port), "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "512",
               "--max-num-seqs", "8", "--num-gpu-blocks-override", "9"]  # 9 x 128 tokens
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # noqa: SIM115
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited rc={self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready in 300 s:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def metrics(self) -> str:
        return requests.get(self.base + "/metrics", timeout=10).text

    def complete(self, prompt: str, **kw) -> requests.Response:
        body = {"model": self.model, "prompt": prompt, "max_tokens": kw.pop("max_tokens", 48), "temperature": 0}
        body.update(kw)
        return requests.post(self.base + "/v1/completions", json=body, timeout=300)

    def chat(self, content: str, **kw) -> requests.Response:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 48,
                "temperature": 0}
        body.update(kw)
        return requests.post(self.base + "/v1/chat/completions", json=body, timeout=300)

    def wait_slots(self, value: float, timeout: float = 30) -> float:
        deadline = time.time() + timeout
        v = -1.0
        while time.time() < deadline:
            v = metric(self.metrics(), "nanospec_slots_in_use")
            if v == value:
                return v
            time.sleep(0.5)
        return v


@pytest.fixture(scope="module")
def server(qwen05b, tmp_path_factory):
    s = Server(qwen05b, tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


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
