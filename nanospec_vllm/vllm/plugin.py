"""vLLM general-plugin entry point (``vllm.general_plugins: nanospec = nanospec_vllm.vllm.plugin:register``).

vLLM calls :func:`register` once in every process it starts (front end, engine core, each worker), before the
engine is built. It is cheap (imports only what the patches touch), idempotent, checks that the installed vLLM
is the supported one, and applies the patch register (:mod:`.patches`). Every patch but two leaves engines whose
speculative config has no ``nanospec`` block as vLLM made them; the register says, per entry, what such an engine
gets and why the two cannot be inert (``Patch.plain``; ``tests/unit/test_patches_inert.py``). A failure raises: vLLM only logs plugin *import* errors, but an
exception from ``register()`` stops start-up, so a broken install never runs half-patched.
Set ``NANOSPEC_DISABLE=1`` to load nothing (e.g. to compare against plain vLLM in one environment).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.nanospec")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    if os.environ.get("NANOSPEC_DISABLE", "").lower() in ("1", "true", "yes"):
        logger.info("NanoSpec plugin disabled by NANOSPEC_DISABLE")
        _registered = True
        return
    from ..version import check_vllm
    from .patches import apply_all

    dist, ver = check_vllm()
    patches = apply_all()
    _registered = True
    logger.debug("NanoSpec plugin registered on %s %s (%d patches)", dist, ver, len(patches))
