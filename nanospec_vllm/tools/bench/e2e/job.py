"""``bench e2e`` engines: one engine job per process. :func:`run_engine` (parent) writes the job file and starts
``python -m nanospec_vllm.tools.bench.e2e --engine-job FILE``; :func:`engine_main` (child) builds the ``vllm.LLM``,
times the step methods in the worker, generates, and writes the raw measurements back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...engine import chat_ids, engine_kwargs, preload_iomp, set_engine_env


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` (a Hugging Face tokenizer, or vLLM's wrapper of one) has a chat template. A base model's
    tokenizer often has none (``chat_template`` is None); an object without the attribute is taken at its word
    that ``apply_chat_template`` works."""
    return bool(getattr(tok, "chat_template", True))


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as the server would encode it: one user turn through the chat template
    (``/v1/chat/completions``) when the tokenizer has one, else the raw text with the tokenizer's special tokens
    (``/v1/completions``), so a base model is benchmarked on its prompts instead of failing in the tokenizer."""
    if has_chat_template(tok):
        return chat_ids(tok, prompt)
    return list(tok.encode(prompt))


class EngineKilled(RuntimeError):
    """An engine process ended by a signal (on a shared machine: usually the OOM killer)."""


# --------------------------------------------------------------------------------------- engine side


def _install_timers(worker: Any) -> bool:
    """Wrap the model runner instance's step methods with wall-clock accumulators (runs in the worker)."""
    import torch

    runner = worker.model_runner
    acc = {"steps": 0, "execute_s": 0.0, "sample_s": 0.0, "propose_s": 0.0, "proposes": 0}
    runner._nanospec_bench_timers = acc
    dev = getattr(runner, "device", None)
    cuda = dev is not None and torch.device(dev).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    for name, key, count in (("execute_model", "execute_s", "steps"), ("sample_tokens", "sample_s", None),
                             ("propose_draft_token_ids", "propose_s", "proposes")):
        orig = getattr(runner, name)  # the bound (possibly plugin-patched) class method

        def wrapped(*a: Any, _orig: Any = orig, _key: str = key, _count: str | None = count, **kw: Any) -> Any:
            sync()
            t = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                sync()
                acc[_key] += time.perf_counter() - t
                if _count:
                    acc[_count] += 1

        setattr(runner, name, wrapped)
    return True


def _read_worker(worker: Any) -> dict[str, Any]:
    runner = worker.model_runner
    rt = getattr(runner, "_nanospec_runtime", None)
    return {"timers": dict(getattr(runner, "_nanospec_bench_timers", {})),
            "nanospec": None if rt is None else {k: int(v) for k, v in rt.stats.totals.items()}}


def _spec_counters(llm: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def _delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if b is None:
        return None
    a = a or {}
    return {k: v - a.get(k, 0) for k, v in b.items()}


def engine_main(job_path: str) -> int:
    """Run one engine job (in its own process): ``job`` JSON in, result JSON to ``job["out"]``."""
    job = json.loads(Path(job_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_engine_env(kv_cache_gib=job.get("kv_cache_gib", 2))
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(job["model"], job.get("spec"), max_model_len=job["max_model_len"],
                           max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False,
                           dtype=job.get("dtype", "bfloat16"))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    templated = has_chat_template(tok)
    groups = [{"task": g["task"], "prompts": [{"prompt_token_ids": prompt_ids(tok, p)} for p in g["prompts"]]}
              for g in job["groups"]]
    too_long = [(g["task"], len(p["prompt_token_ids"])) for g in groups for p in g["prompts"]
                if len(p["prompt_token_ids"]) + job["max_tokens"] > job["max_model_len"]]
    if too_long:
        raise SystemExit(f"prompts too long for --max-model-len {job['max_model_len']} with --max-tokens "
                         f"{job['max_tokens']}: {too_long[:5]}")
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    (ok,) = llm.llm_engine.collective_rpc(_install_timers)
    assert ok
    # warm-up (not timed): one request, then the largest batch, 8 tokens each (first-call kernel set-up)
    warm = SamplingParams(max_tokens=min(8, job["max_tokens"]), temperature=0.0)
    pool = [p for g in groups for p in g["prompts"]]
    llm.generate(pool[:1], [warm], use_tqdm=False)
    if max(job["batches"]) > 1 and len(pool) > 1:
        chunk = pool[:max(job["batches"])]
        llm.generate(chunk, [warm] * len(chunk), use_tqdm=False)
    results = []
    for b in job["batches"]:
        for g in groups:
            sp0, (w0,) = _spec_counters(llm), llm.llm_engine.collective_rpc(_read_worker)
            wall, outputs = 0.0, []
            for i in range(0, len(g["prompts"]), b):
                chunk = g["prompts"][i:i + b]
                t = time.perf_counter()
                outs = llm.generate(chunk, [params] * len(chunk), use_tqdm=False)
                wall += time.perf_counter() - t
                outputs += [list(o.outputs[0].token_ids) for o in outs]
            sp1, (w1,) = _spec_counters(llm), llm.llm_engine.collective_rpc(_read_worker)
            results.append({"task": g["task"], "batch": b, "wall_s": wall, "outputs": outputs,
                            "n_tokens": sum(len(o) for o in outputs), "spec": _delta(sp0, sp1) or {},
                            "nanospec": _delta(w0["nanospec"], w1["nanospec"]),
                            "timers": _delta(w0["timers"], w1["timers"]) or {}})
    Path(job["out"]).write_text(json.dumps({"startup_s": startup_s, "chat_template": templated, "groups": results}))
    return 0


def run_engine(job: dict[str, Any], workdir: Path, tag: str, timeout: float) -> dict[str, Any]:
    job_path = workdir / f"{tag}.job.json"
    job = dict(job, out=str(workdir / f"{tag}.out.json"))
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    for k, v in (("VLLM_HOST_IP", "127.0.0.1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                 ("DO_NOT_TRACK", "1"), ("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gib"]))):
        env.setdefault(k, v)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if job.get("ld_preload"):
        preload_iomp(env)
    log = workdir / f"{tag}.log"
    with open(log, "w") as lf:
        p = subprocess.run([sys.executable, "-m", "nanospec_vllm.tools.bench.e2e", "--engine-job", str(job_path)],
                           stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    if p.returncode != 0 or not Path(job["out"]).is_file():
        tail = log.read_text()[-3000:]
        if p.returncode < 0:
            raise EngineKilled(f"engine {tag} killed by signal {-p.returncode}; log {log}")
        raise RuntimeError(f"engine {tag} failed (rc={p.returncode}); log {log}:\n{tail}")
    return json.loads(Path(job["out"]).read_text())
