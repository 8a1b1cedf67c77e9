"""vLLM attributes NanoSpec reads outside the patched signatures: the register's second drift list.

The patches' parameter lists are checked at start-up (``Patch.expect_params``); the attributes the wrappers, the
runtime and the head read on vLLM's objects are not, and one read as ``getattr(obj, "name", default)`` would turn
a feature off in silence if vLLM renamed it. Each read is either written without a default (a rename fails at
its first use) or listed here, and ``tests/unit/test_vllm_reads.py`` resolves every entry on the installed vLLM's
real classes (a dataclass or pydantic field, a class attribute or method, or an attribute its methods assign to
``self``), so a rename fails there. ``by`` names the readers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VLLM_READS", "Read"]


@dataclass(frozen=True)
class Read:
    owner: str  # "module:Class"
    attr: str
    by: str


_R = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SO = "vllm.v1.core.sched.output:SchedulerOutput"
_SPEC = "vllm.config.speculative:SpeculativeConfig"
_HEAD = "vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead"
_LP = "vllm.model_executor.layers.logits_processor:LogitsProcessor"

VLLM_READS: tuple[Read, ...] = (
    # front end: patch_arg_utils
    Read("vllm.engine.arg_utils:EngineArgs", "speculative_config", "patch_arg_utils"),
    Read("vllm.engine.arg_utils:EngineArgs", "additional_config", "patch_arg_utils"),
    Read("vllm.engine.arg_utils:EngineArgs", "attention_config", "patch_arg_utils.v2_runner_cause"),
    Read("vllm.engine.arg_utils:EngineArgs", "watermark_config", "patch_arg_utils.v2_runner_cause"),
    Read("vllm.config.attention:AttentionConfig", "hisparse_config", "patch_arg_utils.v2_runner_cause"),
    Read("vllm.config.parallel:ParallelConfig", "tensor_parallel_size", "patch_arg_utils, runtime"),
    Read(_SPEC, "method", "patch_arg_utils, runtime"),
    Read(_SPEC, "use_heterogeneous_vocab", "patch_arg_utils (getattr: test stand-ins lack it), runtime"),
    Read(_SPEC, "rejection_sample_method", "patch_arg_utils, runtime (getattr: test stand-ins lack it)"),
    Read(_SPEC, "model", "patch_arg_utils"),
    Read("vllm.config.model:ModelConfig", "get_vocab_size", "patch_arg_utils (getattr: test stand-ins lack it)"),
    Read("vllm.sampling_params:SamplingParams", "extra_args", "patch_sampling_params, config.request_enabled"),
    # engine core and front end: patch_metrics, patch_gpu_model_runner
    Read("vllm.v1.engine:EngineCoreOutputs", "scheduler_stats", "patch_metrics.update_from_output"),
    Read("vllm.v1.worker.gpu_model_runner:AsyncGPUModelRunnerOutput", "_model_runner_output",
         "patch_gpu_model_runner._attach"),
    # worker: runtime, debug
    Read("vllm.config.vllm:VllmConfig", "additional_config", "runtime.maybe_create"),
    Read(_R, "vllm_config", "runtime.maybe_create"),
    Read(_R, "drafter", "runtime.maybe_create"),
    Read(_R, "speculative_config", "runtime"),
    Read(_R, "parallel_config", "runtime"),
    Read(_R, "model_config", "runtime"),
    Read(_R, "scheduler_config", "runtime"),
    Read(_R, "requests", "runtime"),
    Read(_R, "input_batch", "runtime, debug"),
    Read(_R, "discard_request_mask", "runtime"),
    Read("vllm.v1.worker.gpu_input_batch:InputBatch", "num_reqs", "runtime, debug"),
    Read("vllm.v1.worker.gpu_input_batch:InputBatch", "req_ids", "runtime, debug"),
    Read("vllm.v1.worker.gpu_input_batch:CachedRequestState", "sampling_params", "runtime"),
    Read("vllm.v1.worker.gpu_input_batch:CachedRequestState", "prompt_token_ids", "runtime"),
    Read("vllm.v1.worker.gpu_input_batch:CachedRequestState", "output_token_ids", "runtime"),
    Read("vllm.sampling_params:SamplingParams", "all_stop_token_ids", "runtime"),
    Read("vllm.sampling_params:SamplingParams", "stop_token_ids", "runtime"),
    Read(_SO, "finished_req_ids", "runtime.release"),
    Read(_SO, "preempted_req_ids", "runtime.release"),
    Read(_SO, "scheduled_new_reqs", "runtime.admit_scheduled"),
    Read(_SO, "scheduled_cached_reqs", "runtime.admit_scheduled"),
    Read("vllm.v1.core.sched.output:CachedRequestData", "resumed_req_ids", "runtime.admit_scheduled"),
    Read("vllm.v1.attention.backend:CommonAttentionMetadata", "query_start_loc_cpu", "runtime"),
    Read("vllm.v1.spec_decode.metadata:SpecDecodeMetadata", "cu_num_draft_tokens", "runtime, debug"),
    Read("vllm.v1.spec_decode.metadata:SpecDecodeMetadata", "target_logits_indices", "debug"),
    Read("vllm.v1.spec_decode.metadata:SpecDecodeMetadata", "bonus_logits_indices", "debug"),
    # worker: the draft head (head.py) and its binding (ops/binding.py)
    Read(_HEAD, "quant_method", "ops.binding.bind_head"),
    Read(_HEAD, "org_vocab_size", "ops.binding.bind_head"),
    Read(_HEAD, "tp_size", "ops.binding._bind_shard"),
    Read(_HEAD, "tp_rank", "ops.binding._bind_shard"),
    Read(_HEAD, "shard_indices", "ops.binding._bind_shard"),
    Read("vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbeddingShardIndices",
         "org_vocab_start_index", "ops.binding._bind_shard"),
    Read("vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbeddingShardIndices",
         "org_vocab_end_index", "ops.binding._bind_shard"),
    Read(_HEAD, "parallel_group", "ops.binding._bind_shard"),
    Read("vllm.model_executor.models.llama_eagle3:Eagle3LlamaForCausalLM", "draft_id_to_target_id", "ops.binding.bind_head"),
    Read("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer", "num_speculative_tokens", "head"),
    Read("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer", "model", "runtime.maybe_create, head"),
    # the drafter model's head (getattr: a drafter without one is refused by name in bind_head); every drafter
    # vLLM builds has both; checked on the EAGLE-1, EAGLE-3 and Qwen2 (draft_model) classes
    *(Read(m, a, "runtime.maybe_create, ops.binding.bind_head") for m in (
        "vllm.model_executor.models.llama_eagle:EagleLlamaForCausalLM",
        "vllm.model_executor.models.llama_eagle3:Eagle3LlamaForCausalLM",
        "vllm.model_executor.models.qwen2:Qwen2ForCausalLM") for a in ("lm_head", "logits_processor")),
    Read(_LP, "scale", "ops.binding.bind_head"),
    Read(_LP, "soft_cap", "ops.binding.bind_head"),
    Read(_LP, "org_vocab_size", "ops.binding.bind_head"),
)
