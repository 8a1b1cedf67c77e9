"""Random-weight EAGLE-1 and EAGLE-3 heads for the Qwen2.5-Coder-0.5B target (no EAGLE heads exist offline).

They exercise vLLM's ``eagle`` / ``eagle3`` code paths for correctness (acceptance is near zero, output must
still be identical). Llama-architecture heads, since vLLM has no Qwen2 EAGLE class. The EAGLE-3 head drafts over
a reduced 32,000-id vocabulary with ``d2t`` offsets, like the official heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

H, HEADS, KV, HD, INTER, V = 896, 14, 2, 64, 2432, 151_936
DRAFT_VOCAB = 32_000


def _base_config(arch: str) -> dict:
    return {
        "architectures": [arch], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": H,
        "intermediate_size": INTER, "num_hidden_layers": 1, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HD, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "vocab_size": V, "bos_token_id": 151643, "eos_token_id": 151645,
    }


def _w(g: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)


def draft_vocab_ids(seed: int = 0) -> torch.Tensor:
    """Sorted target ids of the reduced draft vocabulary: the first 16k ids plus 16k random others."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.randperm(V - 16_000, generator=g)[: DRAFT_VOCAB - 16_000] + 16_000
    return torch.sort(torch.cat([torch.arange(16_000), rest])).values


def make_eagle3_head(dest: Path, seed: int = 0, reduced: bool = True) -> Path:
    """``reduced``: a 32k draft vocabulary with ``d2t`` offsets; else a full-vocabulary head (no ``d2t``)."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = _base_config("LlamaForCausalLMEagle3")
    dv = DRAFT_VOCAB if reduced else V
    cfg.update(draft_vocab_size=dv, target_hidden_size=H,
               eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 12, 21]})
    g = torch.Generator().manual_seed(seed)
    ids = draft_vocab_ids(seed)
    t = {
        "midlayer.self_attn.q_proj.weight": _w(g, HEADS * HD, 2 * H),
        "midlayer.self_attn.k_proj.weight": _w(g, KV * HD, 2 * H),
        "midlayer.self_attn.v_proj.weight": _w(g, KV * HD, 2 * H),
        "midlayer.self_attn.o_proj.weight": _w(g, H, HEADS * HD),
        "midlayer.mlp.gate_proj.weight": _w(g, INTER, H),
        "midlayer.mlp.up_proj.weight": _w(g, INTER, H),
        "midlayer.mlp.down_proj.weight": _w(g, H, INTER),
        "midlayer.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "midlayer.hidden_norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "midlayer.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "fc.weight": _w(g, H, 3 * H),
        "lm_head.weight": _w(g, dv, H),
    }
    if reduced:
        t["d2t"] = (ids - torch.arange(DRAFT_VOCAB)).to(torch.int64)
    save_file(t, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def make_eagle_head(dest: Path, seed: int = 1) -> Path:
    """Random EAGLE-1 head, written by the trainer's checkpoint writer (``nanospec_vllm.tools.eagle.format``)."""
    from nanospec_vllm.tools.eagle.format import head_config, random_tensors, write_head

    target = dict(_base_config("Qwen2ForCausalLM"), model_type="qwen2", num_hidden_layers=24)
    cfg = head_config(target, intermediate_size=INTER)
    return write_head(dest, cfg, random_tensors(cfg, seed=seed))
