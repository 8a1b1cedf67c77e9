"""Patches on ``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (the V1 runner; ``CPUModelRunner`` inherits
these methods). Each wrapper calls the original unchanged when the engine has no ``nanospec`` block (one
attribute lookup), so engines without NanoSpec are untouched.

* ``_update_states``: slot lifecycle (release finished/preempted before vLLM's update; admit new/resumed after).
* ``sample_tokens``: owns the step: the runtime's per-step context is created before vLLM's method and cleared
  after it (``finally``), and the step's statistics ride on the ``ModelRunnerOutput``.
* ``_sample`` (inside ``sample_tokens``): keep the target's top-k ids of the verification logits.
* ``propose_draft_token_ids`` (inside ``sample_tokens``): update the sets and map rows to slots before drafting;
  add the drafts after.
* ``execute_model``: carry statistics on steps that schedule nothing (slot release only).

The wrappers hold no logic: they call :class:`..runtime.NanoSpecRuntime` methods around vLLM's original.

Removal: when vLLM offers drafter/runner extension points for per-request draft vocabularies.
"""

from __future__ import annotations

import copy
from typing import Any

from .base import Patch
from .scope import nanospec_step

TARGET = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


def _rt(runner: Any) -> Any:
    return getattr(runner, "_nanospec_runtime", None)  # NanoSpec's own attribute: absent on plain engines


def _make_update_states(orig: Any) -> Any:
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        from ..runtime import NanoSpecRuntime

        rt = NanoSpecRuntime.maybe_create(self)
        if rt is None:
            return orig(self, scheduler_output)
        rt.release(scheduler_output)
        out = orig(self, scheduler_output)
        rt.admit_scheduled(self, scheduler_output)
        return out

    return _update_states


def _make_sample(orig: Any) -> Any:
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        rt = _rt(self)
        if rt is not None and logits is not None:
            rt.on_verification_logits(logits)
        return orig(self, logits, spec_decode_metadata)

    return _sample


def _make_propose(orig: Any) -> Any:
    def propose_draft_token_ids(self: Any, scheduler_output: Any, sampled_token_ids: Any, sampling_metadata: Any,
                                hidden_states: Any, sample_hidden_states: Any, aux_hidden_states: Any,
                                spec_decode_metadata: Any, common_attn_metadata: Any, slot_mappings: Any) -> Any:
        rt = _rt(self)
        if rt is None:
            return orig(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                        sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                        slot_mappings)
        rt.before_propose(self, sampled_token_ids, spec_decode_metadata, hidden_states, common_attn_metadata)
        out = orig(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                   sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                   slot_mappings)
        rt.after_propose(out)
        return out

    return propose_draft_token_ids


def _attach(payload: dict, out: Any) -> Any:
    """Put the step's statistics on the runner's output: a ``ModelRunnerOutput``, or the one an
    ``AsyncModelRunnerOutput`` wraps (``_model_runner_output``, read without a default: a rename fails at the
    first step, and ``tests/unit/test_vllm_reads.py`` checks vLLM still sets it). Other outputs (a pipeline
    stage's ``IntermediateTensors``) carry none."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    if out is EMPTY_MODEL_RUNNER_OUTPUT:
        out = copy.copy(out)  # never mutate vLLM's shared empty output
        out.nanospec_stats = payload
        return out
    if isinstance(out, ModelRunnerOutput):
        out.nanospec_stats = payload
    elif isinstance(out, AsyncModelRunnerOutput):
        out._model_runner_output.nanospec_stats = payload
    return out


def _make_execute_model(orig: Any) -> Any:
    def execute_model(self: Any, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        out = orig(self, scheduler_output, intermediate_tensors)
        rt = _rt(self)
        if rt is not None and out is not None:
            from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

            if out is EMPTY_MODEL_RUNNER_OUTPUT:  # nothing scheduled (e.g. only finished requests to clear)
                return _attach(rt.stats.drain(rt.pool, rt.impl), out)
        return out

    return execute_model


def _make_sample_tokens(orig: Any) -> Any:
    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        rt = _rt(self)
        if rt is None:
            return orig(self, grammar_output)
        rt.begin_step()
        payload = None
        try:
            with nanospec_step():  # the sampler patches act only inside this (scope.in_nanospec_step)
                out = orig(self, grammar_output)
        finally:
            payload = rt.end_step()
        return out if out is None else _attach(payload, out)

    return sample_tokens


_PLAIN = "unchanged: the wrapper calls vLLM's method with the same arguments when the runner has no NanoSpec runtime"

PATCHES = [
    Patch(f"{TARGET}._update_states", why="slot lifecycle follows admission, preemption, completion",
          removal="runner request-lifecycle hooks", make=_make_update_states,
          expect_params=("self", "scheduler_output"),
          plain="unchanged: no runtime is created without a `nanospec` block (`additional_config`), and the wrapper "
                "then calls vLLM's method with the same arguments"),
    Patch(f"{TARGET}._sample", why="target top-k at verified positions from logits that already exist",
          removal="a post-verification hook with logits", make=_make_sample,
          expect_params=("self", "logits", "spec_decode_metadata"), plain=_PLAIN),
    Patch(f"{TARGET}.propose_draft_token_ids", why="update sets after verification; row->slot map for drafting",
          removal="a drafter context hook", make=_make_propose,
          expect_params=("self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
                         "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata",
                         "common_attn_metadata", "slot_mappings"), plain=_PLAIN),
    Patch(f"{TARGET}.execute_model", why="carry statistics on steps that schedule nothing (slot release)",
          removal="a stats extension field on ModelRunnerOutput", make=_make_execute_model,
          expect_params=("self", "scheduler_output", "intermediate_tensors"), plain=_PLAIN),
    Patch(f"{TARGET}.sample_tokens", why="owns NanoSpec's per-step context; carries the step's statistics",
          removal="a drafter context hook and a stats extension field on ModelRunnerOutput", make=_make_sample_tokens,
          expect_params=("self", "grammar_output"), plain=_PLAIN),
]
