"""EAGLE-3 head checkpoint format that vLLM's ``method: eagle3`` loads (``Eagle3LlamaForCausalLM``).

What vLLM 0.32 loads (``model_executor/models/llama_eagle3.py``), for a Qwen2 target (``qwen2.py`` implements
``SupportsEagle3``; vLLM concatenates the auxiliary hidden states in increasing layer order):

* ``fc.weight`` [H, 3 x H] (no bias) over ``cat(aux[l0], aux[l1], aux[l2])``, where ``aux[l]`` is the target's
  residual stream **entering** decoder layer ``l`` (``hidden + residual``; ``interfaces.EagleModelMixin``). The
  layer ids are the config's ``eagle_config.eagle_aux_hidden_state_layer_ids``; vLLM's default for an
  ``n``-layer target is ``(2, n // 2, n - 3)``, i.e. ``(2, 12, 21)`` for 24 layers, written explicitly here.
* one decoder layer stored as ``midlayer.*`` (vLLM maps it to ``layers.0.``): ``input_layernorm`` on the token
  embedding, ``hidden_norm`` on the hidden input, q/k/v over the concatenation (2 x H inputs), o_proj, the
  ``post_attention_layernorm`` and the MLP; then ``norm.weight``, the final norm whose output feeds the head's
  ``lm_head`` and whose input (the pre-norm residual) is fed back as the next draft step's hidden input.
* ``lm_head.weight`` [draft_vocab_size, H] and ``d2t`` [draft_vocab_size] int64 offsets: draft row ``r`` is target
  id ``r + d2t[r]`` (target ids sorted). ``t2d`` (bool [vocab_size], the official heads' inverse mask) is
  stored too; vLLM skips it. With ``draft_vocab_size == vocab_size`` there is no ``d2t``: the head either stores a
  full-size ``lm_head`` or none, and then vLLM shares the target's (``_maybe_share_lm_head``); the embedding is
  always the target's (no ``embed_tokens`` stored).

The config says ``"architectures": ["LlamaForCausalLMEagle3"]`` (vLLM has no Qwen2 EAGLE-3 class) with the
target's attention shape, rope settings, ``rms_norm_eps``, ``vocab_size``, ``draft_vocab_size``,
``target_hidden_size`` and the aux layer ids. No biases (``attention_bias: false``).

The draft vocabulary (:func:`draft_vocab`) is the ``size`` ids the training data uses most (pinned ids first),
sorted. Files are written by :func:`.format.write_head` (atomic). No vLLM or torch model import.
"""

from __future__ import annotations

import torch

from .format import head_config

__all__ = ["LM_HEAD_MODES", "check_tensors3", "default_aux_layers", "draft_vocab", "eagle3_config", "lm_head_mode",
           "random_tensors3", "tensor_shapes3"]

ARCH = "LlamaForCausalLMEagle3"
# "reduced": own lm_head over draft_vocab_size rows + d2t/t2d; "own": own full-size lm_head;
# "shared": no lm_head stored (full vocabulary, vLLM shares the target's lm_head)
LM_HEAD_MODES = ("reduced", "own", "shared")


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default auxiliary layers (``SupportsEagle3.get_eagle3_default_aux_hidden_state_layers``)."""
    return [2, num_layers // 2, num_layers - 3]


def eagle3_config(target_cfg: dict, draft_vocab_size: int | None = None, aux_layers: list[int] | None = None,
                  intermediate_size: int | None = None) -> dict:
    """The head's ``config.json``: :func:`.format.head_config` (Llama, one layer, no biases) + the EAGLE-3 keys."""
    cfg = head_config(target_cfg, intermediate_size=intermediate_size)
    v = int(target_cfg["vocab_size"])
    layers = list(aux_layers) if aux_layers is not None else default_aux_layers(int(target_cfg["num_hidden_layers"]))
    if len(layers) != 3 or layers != sorted(set(layers)):
        raise ValueError(f"aux layers must be 3 increasing ids (vLLM concatenates them in order), got {layers}")
    cfg.update({"architectures": [ARCH], "draft_vocab_size": int(draft_vocab_size or v),
                "target_hidden_size": int(target_cfg["hidden_size"]),
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers}})
    if not 0 < cfg["draft_vocab_size"] <= v:
        raise ValueError(f"draft_vocab_size {cfg['draft_vocab_size']} outside 1..{v}")
    return dict(sorted(cfg.items()))


def tensor_shapes3(cfg: dict, lm_head: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor an EAGLE-3 head stores, with its shape (vLLM's checkpoint names, before its fusion).

    ``lm_head``: one of :data:`LM_HEAD_MODES`; default ``reduced`` when ``draft_vocab_size < vocab_size``, else
    ``shared``.
    """
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    v, dv = cfg["vocab_size"], cfg["draft_vocab_size"]
    th = cfg.get("target_hidden_size", h)
    n_aux = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    mode = lm_head or ("reduced" if dv < v else "shared")
    if mode not in LM_HEAD_MODES or (mode == "reduced") != (dv < v):
        raise ValueError(f"lm_head mode {mode!r} does not fit draft_vocab_size {dv} of vocab_size {v}")
    p = "midlayer."
    out = {
        "fc.weight": (h, n_aux * th),
        p + "input_layernorm.weight": (h,),
        p + "hidden_norm.weight": (h,),
        p + "self_attn.q_proj.weight": (nh * hd, 2 * h),
        p + "self_attn.k_proj.weight": (nkv * hd, 2 * h),
        p + "self_attn.v_proj.weight": (nkv * hd, 2 * h),
        p + "self_attn.o_proj.weight": (h, nh * hd),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
    }
    if mode != "shared":
        out["lm_head.weight"] = (dv, h)
    if mode == "reduced":
        out["d2t"] = (dv,)
        out["t2d"] = (v,)
    return out


def lm_head_mode(cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
    if cfg["draft_vocab_size"] < cfg["vocab_size"]:
        return "reduced"
    return "own" if "lm_head.weight" in tensors else "shared"


def check_tensors3(cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``tensors`` is exactly an EAGLE-3 head: names, shapes, and for a reduced
    vocabulary a ``d2t`` whose target ids ``r + d2t[r]`` are strictly increasing, in range and match ``t2d``."""
    want = tensor_shapes3(cfg, lm_head_mode(cfg, tensors))
    extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
    if extra or missing:
        raise ValueError(f"EAGLE-3 head tensors: unexpected {extra}, missing {missing}")
    bad = [f"{k}: {tuple(t.shape)} != {want[k]}" for k, t in tensors.items() if tuple(t.shape) != want[k]]
    if bad:
        raise ValueError("EAGLE-3 head tensor shapes: " + "; ".join(bad))
    if "d2t" in tensors:
        d2t, t2d = tensors["d2t"], tensors["t2d"]
        if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
            raise ValueError(f"d2t must be int64 and t2d bool, got {d2t.dtype} and {t2d.dtype}")
        ids = torch.arange(len(d2t)) + d2t
        if not (ids[1:] > ids[:-1]).all() or ids[0] < 0 or ids[-1] >= cfg["vocab_size"]:
            raise ValueError("d2t: target ids draft_row + d2t[draft_row] must be increasing and within the vocab")
        if not torch.equal(t2d.nonzero().flatten(), ids):
            raise ValueError("t2d does not mark exactly the draft vocabulary's target ids")


def draft_vocab(counts: torch.Tensor, size: int, pinned: list[int] | tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """The reduced draft vocabulary from token counts [vocab_size]: ``ids`` (sorted target ids), ``d2t``, ``t2d``.

    Keeps the ``pinned`` ids (EOS and other special ids the head must be able to draft), then the most counted
    ids (ties: the lower id first); ids never counted fill the rest from the lowest id up (BPE vocabularies
    number frequent merges first).
    """
    v = counts.numel()
    if not 0 < size <= v:
        raise ValueError(f"draft vocabulary size {size} outside 1..{v}")
    key = counts.to(torch.float64).clone()
    if pinned:
        key[torch.tensor(sorted(set(pinned)), dtype=torch.int64)] = float("inf")
    # rank: pinned first, then by count (desc); a stable sort keeps the lower id first among ties
    top = torch.argsort(key, descending=True, stable=True)[:size]
    ids = torch.sort(top).values.to(torch.int64)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[ids] = True
    return {"ids": ids, "d2t": ids - torch.arange(size, dtype=torch.int64), "t2d": t2d}


def random_tensors3(cfg: dict, lm_head: str | None = None, seed: int = 0, std: float = 0.02,
                    vocab_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random bf16 weights (norm weights 1) in the EAGLE-3 format; for a reduced vocabulary ``vocab_ids`` (sorted
    target ids; default: the lowest ``draft_vocab_size`` ids) gives ``d2t``/``t2d``. For tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes3(cfg, lm_head).items():
        if name in ("d2t", "t2d"):
            continue
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)
    if "lm_head.weight" in out and cfg["draft_vocab_size"] < cfg["vocab_size"]:
        dv, v = cfg["draft_vocab_size"], cfg["vocab_size"]
        ids = torch.arange(dv) if vocab_ids is None else vocab_ids.to(torch.int64)
        counts = torch.zeros(v)
        counts[ids] = 1
        dvoc = draft_vocab(counts, dv)
        out["d2t"], out["t2d"] = dvoc["d2t"], dvoc["t2d"]
    return out
