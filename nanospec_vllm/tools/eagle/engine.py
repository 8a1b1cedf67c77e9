"""One vLLM offline-engine job in a fresh process: greedy generation plus speculative-decoding counters.

``run_job(job)`` starts ``python -m nanospec_vllm.tools.eagle.engine`` with the job as JSON on stdin and returns
its JSON result: per prompt the chat-templated prompt ids and the generated ids (greedy unless the job sets
``temperature``/``top_p``/``seed``; ``raw``: prompts are already-rendered text and the texts and finish reasons
come back too), vLLM's spec-decode counters
(``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens`` and the per-position
vector ``..._num_accepted_tokens_per_pos``) and the wall time of ``generate``. Used to make the training data
(the target's own greedy continuations), to measure a head's acceptance and for the side-by-side.

Touches nothing but the result; the child runs with the environment's ``libiomp5.so`` preloaded, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``HF_HUB_OFFLINE=1``
and a 2-4 GiB CPU KV cache. Costs one engine start (~20-40 s here) plus the generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .. import engine as _engine
from ..engine import chat_ids, engine_kwargs

ENGINE_ENV = {**_engine.ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "3", "TOKENIZERS_PARALLELISM": "false"}


def run_job(job: dict, timeout: float = 7200, nice: int = 5, log: Path | None = None) -> dict:
    """Run ``job`` in a child process; raise ``RuntimeError`` with the output tail if it fails.

    ``log``: the child's stderr (vLLM's log, progress bar) goes to this file as it runs instead of memory.
    """
    env = dict(os.environ)
    for k, v in ENGINE_ENV.items():
        env.setdefault(k, v)
    _engine.preload_iomp(env)
    cmd = [sys.executable, "-m", "nanospec_vllm.tools.eagle.engine"]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    if log is None:
        p = subprocess.run(cmd, check=False, input=json.dumps(job), capture_output=True, text=True, timeout=timeout,
                           env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as err:
            p = subprocess.run(cmd, check=False, input=json.dumps(job), stdout=subprocess.PIPE, stderr=err, text=True,
                               timeout=timeout, env=env)
        p.stderr = log.read_text()[-4000:]
    if p.returncode != 0:
        raise RuntimeError(f"vLLM job failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    marker = "NANOSPEC_EAGLE_RESULT "
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"vLLM job printed no result:\n{(p.stdout + p.stderr)[-4000:]}")


def spec_metrics(llm) -> dict:
    """vLLM's spec-decode counters from ``LLM.get_metrics()`` (per-position accepted counts as a list)."""
    out: dict = {}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:spec_decode"):
            continue
        if hasattr(m, "values"):  # Vector: per-position counts
            prev = out.get(m.name) or [0] * len(m.values)
            out[m.name] = [a + b for a, b in zip(prev, m.values)]
        elif hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def summarize(metrics: dict) -> dict:
    """tau = 1 + accepted / drafts and acceptance rate per draft position (accepted at pos i / drafts)."""
    drafts = metrics.get("vllm:spec_decode_num_drafts", 0)
    acc = metrics.get("vllm:spec_decode_num_accepted_tokens", 0)
    per = metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    return {"num_drafts": drafts, "num_draft_tokens": metrics.get("vllm:spec_decode_num_draft_tokens", 0),
            "accepted": acc, "tau": (1 + acc / drafts) if drafts else None,
            "accept_per_pos": [a / drafts for a in per] if drafts else []}


def _main() -> None:
    job = json.load(sys.stdin)
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(int(job.get("threads", os.cpu_count() or 2)))
    llm = LLM(**engine_kwargs(job["model"], job.get("spec"), max_model_len=job.get("max_model_len", 2048),
                              max_num_seqs=job.get("max_num_seqs", 64)))
    tok = llm.get_tokenizer()
    if job.get("raw"):  # already-rendered text (e.g. a chat template's opening), no template applied
        prompts = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in job["prompts"]]
    else:
        prompts = [{"prompt_token_ids": chat_ids(tok, p)[: job.get("max_prompt_tokens", 1024)]}
                   for p in job["prompts"]]
    seed = job.get("seed")  # per request seed + index: identical prompts must not sample identically
    params = [SamplingParams(max_tokens=job.get("max_tokens", 64), temperature=job.get("temperature", 0.0),
                             top_p=job.get("top_p", 1.0), seed=None if seed is None else seed + i, ignore_eos=False)
              for i in range(len(prompts))]
    if job.get("warmup"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    before = spec_metrics(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=bool(job.get("progress")))
    wall = time.perf_counter() - t0
    after = spec_metrics(llm)
    metrics = {}
    for k, v in after.items():
        b = before.get(k)
        metrics[k] = [x - y for x, y in zip(v, b)] if isinstance(v, list) and b else (v - (b or 0) if not
                                                                                       isinstance(v, list) else v)
    res = {"prompt_ids": [p["prompt_token_ids"] for p in prompts],
           "tokens": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics, "wall_s": wall}
    if job.get("raw"):
        res["texts"] = [o.outputs[0].text for o in outs]
        res["finish_reasons"] = [o.outputs[0].finish_reason for o in outs]
    print("NANOSPEC_EAGLE_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    _main()
