"""When a patch whose target cannot see the engine's config acts: only for engines with a ``nanospec`` block.

Most wrappers read the engine's own objects (the runner's ``_nanospec_runtime``, the proposer's, the
``nanospec`` key of a speculative config) and call vLLM's original unchanged without one. Three targets have no
engine object in reach, so they ask this module:

* :func:`in_nanospec_step` (worker): true only while the ``sample_tokens`` wrapper of a runner that has a
  NanoSpec runtime is running (a context variable, set and reset around vLLM's method). vLLM's samplers
  (``apply_top_k_only``, the CPU ``expand_kernel`` override) run inside that call, so their wrappers take
  NanoSpec's path for a NanoSpec engine's step and vLLM's original for every other engine, in the same process
  too.
* :func:`engine_configured` (front end): true once ``EngineArgs.create_speculative_config`` has accepted a
  ``nanospec`` block in this process or in the process that started it (the ``NANOSPEC_ENGINE`` environment
  variable, inherited by the API-server, engine-core and worker processes vLLM starts afterwards). Requests are
  validated before they reach an engine, so this is per process, not per engine: a plain engine created in a
  process that had configured a NanoSpec engine before also gets the per-request switch checked.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

__all__ = ["ENGINE_ENV", "engine_configured", "in_nanospec_step", "mark_engine_configured", "nanospec_step"]

#: set to ``"1"`` by the ``create_speculative_config`` patch when it accepts a ``nanospec`` block
ENGINE_ENV = "NANOSPEC_ENGINE"

_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("nanospec_step", default=False)


@contextlib.contextmanager
def nanospec_step() -> Iterator[None]:
    """The extent of one NanoSpec engine step (the ``sample_tokens`` wrapper)."""
    token = _STEP.set(True)
    try:
        yield
    finally:
        _STEP.reset(token)


def in_nanospec_step() -> bool:
    return _STEP.get()


def mark_engine_configured() -> None:
    os.environ[ENGINE_ENV] = "1"


def engine_configured() -> bool:
    return os.environ.get(ENGINE_ENV) == "1"
