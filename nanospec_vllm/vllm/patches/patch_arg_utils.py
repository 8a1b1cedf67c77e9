"""Patches on ``vllm.engine.arg_utils.EngineArgs`` (front end only).

* ``EngineArgs.add_cli_args``: ``--speculative-config`` also accepts a path to a ``.yaml``/``.yml``/``.json``
  file (vLLM parses it with ``json.loads`` only). Why: users keep the NanoSpec block in a file. Removal: when
  vLLM accepts config files for this flag.
* ``EngineArgs.create_speculative_config``: the single place every entry point (``vllm serve``,
  ``serve --config``, ``LLM(speculative_config=...)``) builds ``SpeculativeConfig``. The ``nanospec`` block is
  popped before vLLM's pydantic model (which forbids extra keys) sees it, validated by
  :func:`nanospec_vllm.config.split_speculative_config` (errors name the key, at start-up, in the front end),
  and stored as JSON in ``additional_config["nanospec"]``, which vLLM pickles to the engine core and workers.
  After vLLM's method, :func:`nanospec_vllm.config.check_against_target` checks the configured ids (and an
  EAGLE-3 head's ``d2t``) against the target vocabulary, so a mismatch fails at start-up.
  NanoSpec runs in vLLM's V1 model runner only (the V2 runner would accept the block and draft with the full
  head): for such engines :func:`require_v1_runner` sets ``VLLM_USE_V2_MODEL_RUNNER=0`` when it is unset (logged
  once; V2 is the default on CUDA), and refuses, naming the cause and the fix, what forces V2 in the installed
  vLLM (``VllmConfig.use_v2_model_runner``): ``VLLM_USE_V2_MODEL_RUNNER=1``, ``--watermark-config``, and
  ``hisparse_config`` in ``--attention-config``.
  Removal: when vLLM has an extension point for out-of-tree speculative options.
Cost: a dict copy at start-up.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .base import Patch

logger = logging.getLogger("vllm.nanospec")


def json_or_file(value: str) -> Any:
    """argparse type for ``--speculative-config``: a JSON string, or a path to a YAML/JSON file."""
    from ...config import NanoSpecConfigError, load_config_file

    if value is None:
        return None
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)  # argparse turns the ValueError into a usage error
    if text.lower().endswith((".yaml", ".yml", ".json")) or os.path.isfile(os.path.expanduser(text)):
        try:
            return load_config_file(os.path.expanduser(text))
        except NanoSpecConfigError as e:
            raise ValueError(str(e)) from None
    return json.loads(text)


def _make_add_cli_args(orig: Any) -> Any:
    fn = orig.__func__ if isinstance(orig, staticmethod) else orig

    def add_cli_args(parser: Any) -> Any:
        parser = fn(parser)
        for opt in ("--speculative-config", "-sc"):
            act = parser._option_string_actions.get(opt)
            if act is not None:
                act.type = json_or_file
                act.help = (act.help or "") + " NanoSpec: may also be a path to a YAML or JSON file."
        return parser

    return staticmethod(add_cli_args)


_v2_logged = False
V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def v2_runner_cause(args: Any) -> tuple[str, str] | None:
    """``(cause, fix)`` when vLLM would run this engine on its V2 model runner whatever NanoSpec sets, else None.

    Mirrors ``VllmConfig.use_v2_model_runner`` of the installed vLLM: HiSparse attention and watermarking force V2
    (even over ``VLLM_USE_V2_MODEL_RUNNER=0``), and the variable decides when it is set (``bool(int(value))``; a
    value that is not an integer is left to vLLM's own error). Reads ``args`` (``EngineArgs``) and the environment.
    """
    att = getattr(args, "attention_config", None)
    hisparse = att.get("hisparse_config") if isinstance(att, dict) else getattr(att, "hisparse_config", None)
    if hisparse is not None:
        return ("--attention-config sets hisparse_config, which forces vLLM's V2 model runner",
                "remove hisparse_config from --attention-config, or remove the `nanospec` block")
    if getattr(args, "watermark_config", None) is not None:
        return ("--watermark-config (watermarking) forces vLLM's V2 model runner",
                "remove --watermark-config, or remove the `nanospec` block")
    raw = os.environ.get(V2_ENV)
    if raw is not None:
        try:
            on = bool(int(raw))
        except ValueError:
            return None
        if on:
            return (f"{V2_ENV}={raw} selects vLLM's V2 model runner",
                    (f"unset {V2_ENV} (NanoSpec then selects the V1 runner) or set {V2_ENV}=0, "
                     "or remove the `nanospec` block"))
    return None


def require_v1_runner(args: Any) -> None:
    """Refuse an engine that V2 would run (:func:`v2_runner_cause`); else select V1 when nothing chose a runner.

    Touches ``os.environ[VLLM_USE_V2_MODEL_RUNNER]`` (inherited by the engine-core and worker processes)."""
    from ...config import NanoSpecConfigError

    cause = v2_runner_cause(args)
    if cause is not None:
        raise NanoSpecConfigError(
            f"NanoSpec runs in vLLM's V1 model runner only, but {cause[0]}: the V2 runner would accept the "
            f"`nanospec` block and silently draft with the full head. Fix: {cause[1]}.")
    global _v2_logged
    if os.environ.get(V2_ENV) is None:
        os.environ[V2_ENV] = "0"
        if not _v2_logged:
            _v2_logged = True
            logger.info("NanoSpec: using vLLM's V1 model runner (%s=0); the V2 runner is not supported yet", V2_ENV)


def _make_create_speculative_config(orig: Any) -> Any:
    def create_speculative_config(self: Any, target_model_config: Any, target_parallel_config: Any) -> Any:
        from ...config import (
            NanoSpecConfigError,
            check_against_target,
            check_engine,
            check_tensor_parallel,
            load_config_file,
            split_speculative_config,
        )

        sc = self.speculative_config
        if isinstance(sc, (str, os.PathLike)):
            sc = json_or_file(str(sc)) if str(sc).strip().startswith("{") else load_config_file(os.path.expanduser(str(sc)))
        ns = None
        if isinstance(sc, dict):
            sc, ns = split_speculative_config(sc)
            self.speculative_config = sc
        if ns is not None:
            ac = self.additional_config
            if ac is None:
                ac = self.additional_config = {}
            if not isinstance(ac, dict):
                raise NanoSpecConfigError("NanoSpec needs additional_config to be a dict (or unset)")
            ac["nanospec"] = ns.model_dump(mode="json")
            check_tensor_parallel(getattr(target_parallel_config, "tensor_parallel_size", 1))  # before vLLM builds
        elif isinstance(self.additional_config, dict) and "nanospec" in self.additional_config:
            # given directly as --additional-config '{"nanospec": {...}}': validate it the same way
            _, ns = split_speculative_config({"nanospec": self.additional_config["nanospec"]},
                                             source="additional_config")
            if ns is not None:
                self.additional_config["nanospec"] = ns.model_dump(mode="json")
        if ns is not None:
            require_v1_runner(self)
        result = orig(self, target_model_config, target_parallel_config)
        if ns is not None:
            method = check_engine(getattr(result, "method", None),
                                  getattr(target_parallel_config, "tensor_parallel_size", 1),
                                  bool(getattr(result, "use_heterogeneous_vocab", False)))
            vocab = getattr(target_model_config, "get_vocab_size", None)
            if vocab is not None:  # (None only for the fakes of unit tests)
                check_against_target(ns, int(vocab()), method, getattr(result, "model", None))
        return result

    return create_speculative_config


PATCHES = [
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
        why="--speculative-config accepts a YAML/JSON file path as well as a JSON string",
        removal="when vLLM parses config files for --speculative-config",
        make=_make_add_cli_args,
        expect_params=("parser",),
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.create_speculative_config",
        why="pop and validate the `nanospec` block before SpeculativeConfig (extra='forbid') sees it; "
        "carry it to the workers in additional_config",
        removal="when vLLM has an extension point for out-of-tree speculative options",
        make=_make_create_speculative_config,
        expect_params=("self", "target_model_config", "target_parallel_config"),
    ),
]
