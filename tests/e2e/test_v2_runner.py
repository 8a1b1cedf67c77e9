"""An engine start with NanoSpec on vLLM's V2 model runner fails at start-up, naming the variable and the fix
(the V2 runner would accept the block and silently draft with the full head)."""

from __future__ import annotations

import pytest

from nanospec_vllm.config import NanoSpecConfigError

pytestmark = pytest.mark.e2e


def test_llm_start_with_v2_forced_fails_naming_the_variable(qwen05b, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with pytest.raises(NanoSpecConfigError, match=r"VLLM_USE_V2_MODEL_RUNNER=1 selects vLLM's V2 model runner.*"
                                                  r"Fix: unset VLLM_USE_V2_MODEL_RUNNER"):
        LLM(model=str(qwen05b), enforce_eager=True, max_model_len=512,
            speculative_config={"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 2,
                                "nanospec": {}})
