"""The patch register: every change NanoSpec makes to vLLM, in one list (:func:`all_patches`).

Each :class:`~.base.Patch` says why it exists and when it can go; the table in ``docs/architecture.md`` is
generated from this list (``python -m nanospec_vllm.vllm.patches.table``) and a unit test keeps the two equal.
``tests/unit/test_patch_drift.py`` checks every target still exists with the parameters its patch expects.
Every patch NanoSpec makes is here, including the one that is not on vLLM (``patch_importlib_metadata``, which
only the ``nanospec serve`` process turns on).

Engines without a ``nanospec`` block: each entry's ``plain`` says what such an engine gets. Every wrapper but two
calls vLLM's original unchanged for it (the runner's or proposer's NanoSpec runtime, the config's ``nanospec`` key,
or :mod:`.scope` where the target has no engine object in reach); the two that cannot be inert say why
(``SchedulerStats.nanospec_stats``, ``importlib.metadata:version``). ``tests/unit/test_patches_inert.py`` checks
every "unchanged" claim. vLLM attributes read outside the patched signatures are listed in :mod:`.reads`.
"""

from __future__ import annotations

from .base import Patch, PatchError

__all__ = ["Patch", "PatchError", "all_patches", "apply_all", "markdown_table"]


def all_patches() -> list[Patch]:
    from . import (
        patch_arg_utils,
        patch_cpu_triton_utils,
        patch_gpu_model_runner,
        patch_importlib_metadata,
        patch_llm_base_proposer,
        patch_metrics,
        patch_sampling_params,
        patch_topk_sampler,
    )

    return [
        *patch_arg_utils.PATCHES,
        *patch_sampling_params.PATCHES,
        *patch_cpu_triton_utils.PATCHES,
        *patch_topk_sampler.PATCHES,
        *patch_gpu_model_runner.PATCHES,
        *patch_llm_base_proposer.PATCHES,
        *patch_metrics.PATCHES,
        *patch_importlib_metadata.PATCHES,
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


def markdown_table() -> str:
    """The register as the markdown table ``docs/architecture.md`` shows (one row per patched symbol)."""
    rows = ["| file | symbol (`vllm.` omitted) | why | engines without `nanospec` | removal |",
            "|---|---|---|---|---|"]
    for p in all_patches():
        module = p.make.__module__.rsplit(".", 1)[-1]
        mod, _, attr = p.target.partition(":")
        rows.append(f"| `{module}` | `{mod.removeprefix('vllm.')}:{attr}` | {p.why} | {p.plain} | {p.removal} |")
    return "\n".join(rows) + "\n"
