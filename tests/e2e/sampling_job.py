"""Run one seeded sampling job on a vLLM engine in a fresh process: ``python sampling_job.py < job.json``.

Used by ``test_exact_sampling.py``. Unlike ``engine_job.py`` every request carries its own seed, temperature and
NanoSpec switch, the prompt is raw token ids (no chat template: short prompts keep a batch of hundreds of
requests cheap), and the job can inject a deliberate exactness bug into NanoSpec's probabilistic draft head
(``inject: "pruned-as-full"``) so the test can show that its statistic catches one.

Job keys: ``model``, ``spec`` (speculative config or absent), ``prompts`` (texts, encoded without a chat
template), ``requests`` (a list of ``{"prompt", "seed", "temperature", "nanospec"}``: prompt index, vLLM
per-request seed, temperature, switch or None for the engine default), ``max_tokens``, ``inject`` (optional),
``out``. Writes ``{"tokens", "steps", "metrics", "seconds"}`` where ``steps[i]`` is request ``i``'s
``[[drafted, accepted], ...]`` per verification step (vLLM's detailed per-request spec-decode metrics; None
without speculation). Cost: one engine start (two 0.5B models with ``draft_model``) plus one generate call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from nanospec_vllm.tools.engine import engine_kwargs, set_engine_env


def inject_pruned_as_full() -> None:
    """The bug "the pruned draft distribution is sampled, the full one is reported": drafts come from the
    softmax over the active set, but the rejection sampler is handed the full head's probabilities. With a
    drafter equal to the target every draft is then accepted and the output follows the pruned distribution."""
    import torch

    from nanospec_vllm.vllm.head import SparseDraftHead

    orig = SparseDraftHead._probabilistic

    def bugged(self: SparseDraftHead, proposer: Any, hidden: torch.Tensor, sampling_metadata: Any, *rest: Any) -> Any:
        tokens, _pruned = orig(self, proposer, hidden, sampling_metadata, *rest)
        full = proposer.model.compute_logits(hidden).float()
        temp = sampling_metadata.temperature
        full = full / temp.view(-1, 1).clamp_min(1e-5)
        return tokens, full.softmax(dim=-1)

    SparseDraftHead._probabilistic = bugged  # type: ignore[method-assign]


def main() -> None:
    job = json.load(sys.stdin)
    for k, v in (job.get("env") or {}).items():
        os.environ[k] = str(v)
    set_engine_env(kv_cache_gib=1)
    if job.get("inject") == "pruned-as-full":
        inject_pruned_as_full()
    elif job.get("inject"):
        raise SystemExit(f"unknown inject: {job['inject']!r}")
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    spec = job.get("spec")
    extra_engine: dict[str, Any] = {"per_request_spec_decode_metrics": "detailed"} if spec else {}
    llm = LLM(**engine_kwargs(job["model"], spec, max_model_len=job.get("max_model_len", 256),
                              max_num_seqs=job.get("max_num_seqs", 256), **extra_engine))
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in job["prompts"]]
    params = []
    for r in job["requests"]:
        extra = None if r.get("nanospec") is None else {"nanospec": r["nanospec"]}
        params.append(SamplingParams(max_tokens=job["max_tokens"], temperature=r["temperature"], seed=r["seed"],
                                     ignore_eos=True, extra_args=extra))
    prompts = [{"prompt_token_ids": prompt_ids[r["prompt"]]} for r in job["requests"]]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t2 = time.perf_counter()
    metrics: dict[str, Any] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            metrics[m.name] = metrics.get(m.name, 0) + m.value
        elif m.name.startswith("vllm:spec_decode") and hasattr(m, "values"):  # per-position vector
            metrics[m.name] = list(m.values)
    steps = []
    for o in outs:
        sd = o.outputs[0].spec_decode_metrics
        steps.append(None if sd is None else [list(x) for x in zip(sd.per_step_drafted, sd.per_step_accepted)])
    with open(job["out"], "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "steps": steps, "metrics": metrics,
                   "prompt_ids": prompt_ids, "seconds": {"start": t1 - t0, "generate": t2 - t1}}, f)


if __name__ == "__main__":
    main()
