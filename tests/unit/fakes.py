"""A fake vLLM V1 model runner for the runtime's unit tests: only the fields :class:`NanoSpecRuntime` reads
(speculative / parallel / model / scheduler configs, ``requests``, ``input_batch``, ``discard_request_mask``), and
the admission of a batch of requests as vLLM's ``_update_states`` would hand it over. Shared by
``test_runtime_fake.py``, ``test_host_sync.py`` and ``test_debug_recorder.py``."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import numpy as np


def fake_runner(vocab: int, device: str = "cpu", max_num_seqs: int = 4, **fields: Any) -> NS:
    """The runner fields the runtime reads; ``fields`` add or replace attributes (``vllm_config``, ``drafter``,
    ``model`` for :meth:`NanoSpecRuntime.maybe_create`)."""
    r = NS(
        speculative_config=NS(method="draft_model", use_heterogeneous_vocab=False),
        parallel_config=NS(tensor_parallel_size=1), device=device,
        model_config=NS(get_vocab_size=lambda: vocab, hf_config=NS(eos_token_id=999), tokenizer="/nonexistent",
                        trust_remote_code=False),
        scheduler_config=NS(max_num_seqs=max_num_seqs), requests={},
        input_batch=NS(num_reqs=0, req_ids=[], num_computed_tokens_cpu=np.zeros(max_num_seqs, dtype=np.int64),
                       num_prompt_tokens=np.zeros(max_num_seqs, dtype=np.int64)),
        discard_request_mask=NS(np=np.zeros(max_num_seqs, dtype=bool)),
    )
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def admit(r: NS, rt: Any, reqs: dict[str, tuple[list[int], object]]) -> None:
    """Schedule ``reqs`` (id -> (prompt ids, per-request switch or None)) as new requests and make them the batch,
    in order, through the runtime's release / admit hooks."""
    for rid, (prompt, switch) in reqs.items():
        r.requests[rid] = NS(prompt_token_ids=prompt, output_token_ids=[],
                             sampling_params=NS(extra_args=None if switch is None else {"nanospec": switch},
                                                all_stop_token_ids=[]))
    so = NS(finished_req_ids=[], preempted_req_ids=[], scheduled_new_reqs=[NS(req_id=x) for x in reqs],
            scheduled_cached_reqs=NS(resumed_req_ids=[]))
    rt.release(so)
    rt.admit_scheduled(r, so)
    r.input_batch.req_ids = list(reqs)
    r.input_batch.num_reqs = len(reqs)
