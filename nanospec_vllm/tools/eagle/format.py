"""EAGLE-1 head checkpoint format that vLLM's ``method: eagle`` loads (``EagleLlamaForCausalLM``).

What vLLM 0.32 loads (``model_executor/models/llama_eagle.py``): ``fc`` (no bias) over ``cat(embed(next token),
target feature)``, one Llama decoder layer whose first input norm is an identity, no final norm; ``embed_tokens``
and ``lm_head`` are taken from the target (``v1/spec_decode/llm_base_proposer.py``). vLLM has no Qwen2 EAGLE
class, so a head for a Qwen2 target is written as ``"architectures": ["LlamaForCausalLM"]`` with the target's
attention shape, rope settings, ``rms_norm_eps`` and ``vocab_size`` copied from its ``config.json``.

Stored tensors are exactly :func:`tensor_shapes` (any other name raises at vLLM's load, except ``*.bias`` which
vLLM drops silently, so a bias would be lost without notice: the writer refuses both). Qwen2's q/k/v biases are
not copied: the head is its own layer and is trained without biases (``attention_bias: false``).

Touches only the destination folder; written atomically (a temporary sibling folder, then a rename). Costs the
size of the weights (~33 MB in bf16 for the Qwen2.5-Coder-0.5B head). No vLLM or torch model import.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ARCH_KEYS", "head_config", "random_tensors", "read_head", "tensor_shapes", "write_head"]

# keys copied from the target's config (when present) into the head's config
ARCH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
             "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id")


def head_config(target_cfg: dict, intermediate_size: int | None = None) -> dict:
    """The head's ``config.json`` from the target's: Llama architecture, one layer, no biases, untied."""
    cfg = {k: target_cfg[k] for k in ARCH_KEYS if target_cfg.get(k) is not None}
    cfg.setdefault("head_dim", target_cfg["hidden_size"] // target_cfg["num_attention_heads"])
    cfg.setdefault("hidden_act", "silu")
    if "rope_theta" not in cfg and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta")
    if intermediate_size is not None:
        cfg["intermediate_size"] = int(intermediate_size)
    cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16"})
    return dict(sorted(cfg.items()))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an EAGLE-1 head stores, with its shape (vLLM's names before its q/k/v and gate/up fusion)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p = "layers.0."
    return {
        "fc.weight": (h, 2 * h),
        p + "self_attn.q_proj.weight": (nh * hd, h),
        p + "self_attn.k_proj.weight": (nkv * hd, h),
        p + "self_attn.v_proj.weight": (nkv * hd, h),
        p + "self_attn.o_proj.weight": (h, nh * hd),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
        p + "post_attention_layernorm.weight": (h,),
    }


def random_tensors(cfg: dict, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random bf16 weights (norm weights 1) in the head's format: for tests and as a training start."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("layernorm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)
    return out


def check_tensors(cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the expected names and shapes."""
    want = tensor_shapes(cfg)
    extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
    if extra or missing:
        raise ValueError(f"EAGLE head tensors: unexpected {extra}, missing {missing}")
    bad = [f"{k}: {tuple(t.shape)} != {want[k]}" for k, t in tensors.items() if tuple(t.shape) != want[k]]
    if bad:
        raise ValueError("EAGLE head tensor shapes: " + "; ".join(bad))


def write_head(dest: str | os.PathLike[str], cfg: dict, tensors: dict[str, torch.Tensor],
               extra_files: dict[str, str] | None = None, check=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``extra_files``, name -> text) atomically to ``dest``.

    Floating-point tensors are stored in bf16, others (an EAGLE-3 head's ``d2t``/``t2d``) as they are. ``check``
    (default :func:`check_tensors`, the EAGLE-1 format) raises on a wrong tensor set. An existing ``dest`` is
    replaced. Returns ``dest``.
    """
    (check or check_tensors)(cfg, tensors)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def read_head(folder: str | os.PathLike[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
