"""Patches on ``vllm.engine.arg_utils.EngineArgs`` (front end only).

* ``EngineArgs.add_cli_args``: ``--speculative-config`` also accepts a path to a ``.yaml``/``.yml``/``.json``
  file whose config has a ``nanospec`` block (vLLM parses the flag with ``json.loads`` only). Why: users keep the
  NanoSpec block in a file. The parser is built before any config exists, so the patch decides per value: every
  other value goes to vLLM's own type (same result, same errors), and a file without a ``nanospec`` block is
  refused as vLLM refuses any path. Removal: when vLLM accepts config files for this flag.
* ``EngineArgs.create_speculative_config``: the single place every entry point (``vllm serve``,
  ``serve --config``, ``LLM(speculative_config=...)``) builds ``SpeculativeConfig``. The ``nanospec`` block is
  popped before vLLM's pydantic model (which forbids extra keys) sees it (a config without that key, and no
  ``nanospec`` in ``additional_config``, reaches vLLM's method untouched), validated by
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

import argparse
import contextlib
import json
import logging
import os
from typing import Any

from .base import Patch
from .scope import mark_engine_configured

logger = logging.getLogger("vllm.nanospec")


_EXTS = (".yaml", ".yml", ".json")


def _config_path(value: Any) -> str | None:
    """The file a ``--speculative-config`` value names, or None when it is not a path (JSON, ``None``, ...)."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = str(value).strip()
    if not text or text.startswith("{"):
        return None
    path = os.path.expanduser(text)
    return path if text.lower().endswith(_EXTS) or os.path.isfile(path) else None


def load_nanospec_file(path: str) -> dict[str, Any] | None:
    """The speculative config in a YAML/JSON file when it has a ``nanospec`` block, else None (the file is then
    vLLM's to refuse, as it would without the plugin). Raises NanoSpecConfigError for a missing or unreadable
    file."""
    from ...config import load_config_file

    data = load_config_file(path)
    return data if "nanospec" in data else None


def speculative_config_type(vllm_type: Any) -> Any:
    """argparse type for ``--speculative-config``: vLLM's own ``vllm_type`` (a JSON string) for every value, except
    a path to a YAML/JSON file whose config has a ``nanospec`` block, which is read. A file without one is refused
    (vLLM refuses a path too), naming the reason."""

    def speculative_config(value: str) -> Any:
        from ...config import NanoSpecConfigError

        path = _config_path(value)
        if path is None:
            return vllm_type(value)
        try:
            data = load_nanospec_file(path)
        except NanoSpecConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if data is None:
            raise argparse.ArgumentTypeError(
                f"{value}: --speculative-config takes a JSON string; a file is read only when its config has a "
                "`nanospec` block (the NanoSpec plugin)")
        return data

    speculative_config._nanospec_type = True  # type: ignore[attr-defined]
    return speculative_config


def _make_add_cli_args(orig: Any) -> Any:
    fn = orig.__func__ if isinstance(orig, staticmethod) else orig

    def add_cli_args(parser: Any) -> Any:
        parser = fn(parser)
        act = parser._option_string_actions.get("--speculative-config")  # `-sc` is the same action
        if act is not None and not getattr(act.type, "_nanospec_type", False):
            act.type = speculative_config_type(act.type)
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
    att = args.attention_config  # EngineArgs fields (a dict before EngineArgs.__post_init__ converts it)
    hisparse = att.get("hisparse_config") if isinstance(att, dict) else None if att is None else att.hisparse_config
    if hisparse is not None:
        return ("--attention-config sets hisparse_config, which forces vLLM's V2 model runner",
                "remove hisparse_config from --attention-config, or remove the `nanospec` block")
    if args.watermark_config is not None:
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
            split_speculative_config,
        )

        sc = self.speculative_config
        if isinstance(sc, (str, os.PathLike)):  # LLM(speculative_config="spec.yaml" or a JSON string)
            path = _config_path(sc)
            if path is not None:
                if os.path.isfile(path):  # else vLLM's to refuse
                    sc = load_nanospec_file(path) or sc
            else:
                with contextlib.suppress(ValueError):
                    loaded = json.loads(str(sc))
                    sc = loaded if isinstance(loaded, dict) and "nanospec" in loaded else sc
        ns = None
        if isinstance(sc, dict) and "nanospec" in sc:  # anything else is vLLM's alone, untouched
            sc, ns = split_speculative_config(sc)
            self.speculative_config = sc
        if ns is not None:
            ac = self.additional_config
            if ac is None:
                ac = self.additional_config = {}
            if not isinstance(ac, dict):
                raise NanoSpecConfigError("NanoSpec needs additional_config to be a dict (or unset)")
            ac["nanospec"] = ns.model_dump(mode="json")
            check_tensor_parallel(target_parallel_config.tensor_parallel_size)  # before vLLM builds
        elif isinstance(self.additional_config, dict) and "nanospec" in self.additional_config:
            # given directly as --additional-config '{"nanospec": {...}}': validate it the same way
            _, ns = split_speculative_config({"nanospec": self.additional_config["nanospec"]},
                                             source="additional_config")
            if ns is not None:
                self.additional_config["nanospec"] = ns.model_dump(mode="json")
        if ns is not None:
            require_v1_runner(self)
            mark_engine_configured()
        result = orig(self, target_model_config, target_parallel_config)
        if ns is not None:
            # the two defaults below serve the stand-ins of tests/unit/test_v2_runner.py; on real vLLM objects
            # tests/unit/test_vllm_reads.py checks both attributes exist (patches/reads.py)
            method = check_engine(result.method, target_parallel_config.tensor_parallel_size,
                                  bool(getattr(result, "use_heterogeneous_vocab", False)),
                                  getattr(result, "rejection_sample_method", "standard"))
            vocab = getattr(target_model_config, "get_vocab_size", None)
            if vocab is not None:
                check_against_target(ns, int(vocab()), method, result.model)
        return result

    return create_speculative_config


PATCHES = [
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
        why="--speculative-config accepts a YAML/JSON file path as well as a JSON string",
        removal="when vLLM parses config files for --speculative-config",
        make=_make_add_cli_args,
        expect_params=("parser",),
        plain="unchanged: every value goes to vLLM's own type except a file path whose config has a `nanospec` "
              "block (vLLM refuses every path; a file without one is still refused)",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.create_speculative_config",
        why="pop and validate the `nanospec` block before SpeculativeConfig (extra='forbid') sees it; "
        "carry it to the workers in additional_config",
        removal="when vLLM has an extension point for out-of-tree speculative options",
        make=_make_create_speculative_config,
        expect_params=("self", "target_model_config", "target_parallel_config"),
        plain="unchanged: a config without a `nanospec` key (and no `nanospec` in additional_config) goes to vLLM's "
              "method as it came",
    ),
]
