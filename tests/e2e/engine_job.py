"""Run one vLLM engine job in a fresh process: ``python engine_job.py < job.json`` (writes ``job["out"]``).

Each engine gets its own process (clean memory, vLLM's spawn rules). The job says which model, which
speculative config, which prompts and per-request switches; the result holds the token ids and vLLM's
speculative-decoding counters (from ``LLM.get_metrics()``) and, when NanoSpec ran, the worker's pool state. With
``"env": {"NANOSPEC_DEBUG_RECORD": 1}`` it also returns the worker's debug record (``nanospec_vllm/vllm/debug.py``:
per request, the ids the runtime added and why, the active sets it held and each step's drafts in order), the
prompt ids and the request ids. ``"inject": "d2t-shift"`` plants a bug in NanoSpec (not in vLLM): its draft-row map
is built from ``d2t + 1``, so every target id is scored with its neighbour's lm_head row.
"""

from __future__ import annotations

import json
import os
import sys

from nanospec_vllm.tools.engine import chat_ids, engine_kwargs, set_engine_env


def inject_d2t_shift() -> None:
    """NanoSpec's target id -> head row map read from a ``d2t`` off by one (vLLM's own head keeps the right one).
    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the patch reaches it."""
    from nanospec_vllm.ops import binding

    orig = binding.row_index_from_d2t
    binding.row_index_from_d2t = lambda d2t, vocab_size: orig(d2t + 1, vocab_size)


def main() -> None:
    job = json.load(sys.stdin)
    for k, v in (job.get("env") or {}).items():
        os.environ[k] = str(v)
    set_engine_env(kv_cache_gib=2)
    if job.get("inject") == "d2t-shift":
        inject_d2t_shift()
    elif job.get("inject"):
        raise SystemExit(f"unknown inject: {job['inject']!r}")
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(job["model"], job.get("spec"), max_model_len=job.get("max_model_len", 2048),
                              max_num_seqs=job.get("max_num_seqs", 64)))
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_ids(tok, p)} for p in job["prompts"]]
    switches = job.get("switches") or [None] * len(prompts)
    params = []
    for s in switches:
        extra = None if s is None else {"nanospec": s}
        params.append(SamplingParams(max_tokens=job.get("max_tokens", 64), temperature=job.get("temperature", 0.0),
                                     seed=job.get("seed"), ignore_eos=job.get("ignore_eos", False), extra_args=extra))
    outs = llm.generate(prompts, params, use_tqdm=False)
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            metrics[m.name] = metrics.get(m.name, 0) + m.value
        elif m.name.startswith("vllm:spec_decode") and hasattr(m, "values"):  # per-position vector
            metrics[m.name] = list(m.values)
    # vLLM's worker forgets a finished request at the engine step after it finished (its own `requests` dict
    # too); the offline LLM stops stepping as soon as outputs are done, so take that one step here.
    llm.llm_engine.step()
    pool = llm.llm_engine.collective_rpc(_pool_state) if job.get("spec", {}).get("nanospec") is not None else None
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics, "pool": pool}
    if os.environ.get("NANOSPEC_DEBUG_RECORD") == "1":
        result["debug"] = llm.llm_engine.collective_rpc(_debug_state)
        result["prompt_ids"] = [p["prompt_token_ids"] for p in prompts]
        result["request_ids"] = [o.request_id for o in outs]
    with open(job["out"], "w") as f:
        json.dump(result, f)


def _pool_state(worker):
    rt = getattr(worker.model_runner, "_nanospec_runtime", None)
    if rt is None:
        return None
    b = rt.head.binding
    return {"in_use": rt.pool.num_in_use, "impl": rt.impl, "head_rows": None if b is None else int(b.weight.shape[0]),
            "row_index": b is not None and b.row_index is not None, "totals": dict(rt.stats.totals)}


def _debug_state(worker):
    rt = getattr(worker.model_runner, "_nanospec_runtime", None)
    return None if rt is None or rt.debug is None else rt.debug.state()


if __name__ == "__main__":
    main()
