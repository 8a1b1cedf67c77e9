"""Patch on ``vllm.sampling_params.SamplingParams._verify_extra_args``.

Why: the per-request switch ``extra_args["nanospec"]`` (OpenAI ``vllm_xargs``) must be rejected with HTTP 400
naming the field when invalid. This method runs synchronously in the API server when the request is turned into
SamplingParams, and a ``VLLMValidationError`` raised there becomes a 400 (a ValueError raised later, inside
``generate()``, would become a 500 or an SSE error). SamplingParams carry no engine, so the check runs only in a
process where a NanoSpec engine was configured (:func:`.scope.engine_configured`: the front end that built it and
the processes it started); elsewhere the wrapper is vLLM's method alone, and a ``nanospec`` key is just one of
the request's ``extra_args``. An invalid switch that gets past (a plain engine) is ignored by the worker
(:func:`nanospec_vllm.config.request_enabled` falls back to the engine default).
Removal: when vLLM lets plugins validate ``extra_args``.
"""

from __future__ import annotations

from typing import Any

from .base import Patch
from .scope import engine_configured


def _make(orig: Any) -> Any:
    def _verify_extra_args(self: Any) -> None:
        orig(self)
        extra = self.extra_args
        if isinstance(extra, dict) and "nanospec" in extra and engine_configured():
            from vllm.exceptions import VLLMValidationError

            from ...config import parse_switch

            try:
                parse_switch(extra["nanospec"])
            except ValueError as e:
                raise VLLMValidationError(
                    f"vllm_xargs.nanospec: {e}", parameter="vllm_xargs.nanospec", value=extra["nanospec"]
                ) from None

    return _verify_extra_args


PATCHES = [
    Patch(
        target="vllm.sampling_params:SamplingParams._verify_extra_args",
        why="reject an invalid per-request `nanospec` switch with HTTP 400 before the request reaches the engine",
        removal="when vLLM lets plugins validate extra_args",
        make=_make,
        expect_params=("self",),
        plain="unchanged: checks the switch only in a process that configured a NanoSpec engine (the front end "
              "that built it, and the processes it started)",
    )
]
