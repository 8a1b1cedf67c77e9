"""The EAGLE-3 head as a plain PyTorch module, computing what vLLM's ``Eagle3LlamaForCausalLM`` computes.

vLLM (``model_executor/models/llama_eagle3.py``, ``norm_before_residual`` and ``norm_output`` off), one draft
pass on inputs ``(e, x)``: ``e`` the embedding of the input token, ``x`` the hidden input (first pass:
``fc(cat(aux_l0, aux_l1, aux_l2))``; later draft steps: the previous pass's pre-norm output)::

    r   = x + o_proj(attn(cat(input_layernorm(e), hidden_norm(x))))   # q/k/v over 2 x H, rope, GQA, causal
    pre = r + mlp(post_attention_layernorm(r))
    out = norm(pre)                                                    # -> lm_head -> draft logits

``pre`` is what vLLM feeds back as the next draft step's hidden input. Parameter names equal the stored
checkpoint names (:mod:`.format3`), so ``state_dict()`` is the checkpoint (less ``d2t``/``t2d``, which the trainer
adds); with a shared lm_head (full vocabulary) the module has no ``lm_head`` and the caller passes the target's.

Training (:meth:`Eagle3Head.forward_unrolled`): the training-time test, the draft loop vLLM runs, for every
position at once, with the attention vLLM's draft KV cache gives each step; loss (:func:`eagle3_loss`): soft
cross-entropy against the target's next-token distribution restricted to the draft vocabulary, over a sampled
set of rows (:func:`.model.candidate_ids`), at positions whose next token the draft vocabulary holds. No vLLM
import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import _Mlp, _rope_theta, attend

__all__ = ["Eagle3Head", "eagle3_loss"]


class _Attn3(nn.Module):
    def __init__(self, h: int, nh: int, nkv: int, hd: int):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(2 * h, nh * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)


class _Norm(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return n * self.weight.to(x.dtype)


class _MidLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], float(cfg["rms_norm_eps"])
        self.input_layernorm = _Norm(h, eps)
        self.hidden_norm = _Norm(h, eps)
        self.self_attn = _Attn3(h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
        self.post_attention_layernorm = _Norm(h, eps)
        self.mlp = _Mlp(h, cfg["intermediate_size"])


class Eagle3Head(nn.Module):
    """``own_lm_head``: the head has its own ``lm_head`` [draft_vocab_size, H] (reduced or own full vocabulary);
    False: full vocabulary through the target's lm_head, passed to :func:`eagle3_loss` by the caller."""

    def __init__(self, cfg: dict, own_lm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        h = cfg["hidden_size"]
        n_aux = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        self.fc = nn.Linear(n_aux * cfg.get("target_hidden_size", h), h, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = _Norm(h, float(cfg["rms_norm_eps"]))
        if own_lm_head:
            self.lm_head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        hd = cfg["head_dim"]
        self.register_buffer("inv_freq", 1.0 / (_rope_theta(cfg) ** (torch.arange(0, hd, 2).float() / hd)),
                             persistent=False)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        freqs = pos.float()[:, None] * self.inv_freq[None, :]  # neox style, as vLLM's Llama rotary embedding
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _block(self, e: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass -> (normed output, pre-norm output). This pass's keys/values are appended to ``keys`` /
        ``values``; ``mask`` [n, all keys] bool (None: causal over this pass only)."""
        m = self.midlayer
        a = m.self_attn
        xin = torch.cat([m.input_layernorm(e), m.hidden_norm(x)], dim=-1)
        r = x + attend(a, xin, pos, keys, values, mask, self._rope)
        n = m.post_attention_layernorm(r)
        pre = r + m.mlp.down_proj(F.silu(m.mlp.gate_proj(n)) * m.mlp.up_proj(n))
        return self.norm(pre), pre

    def forward(self, emb: torch.Tensor, aux: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First pass over a sequence: ``emb`` [T, H] (embedding of the next token), ``aux`` [T, 3 x H] (the
        concatenated auxiliary hidden states), ``pos`` [T] -> (normed [T, H], pre-norm [T, H])."""
        return self._block(emb, self.fc(aux), pos, [], [], None)

    def forward_unrolled(self, emb: torch.Tensor, aux: torch.Tensor, pos: torch.Tensor,
                         steps: int) -> list[torch.Tensor]:
        """The training-time test: ``steps`` draft passes for every base position; returns the normed outputs.

        Pass 0 is :meth:`forward`. Pass ``s`` >= 1 at base position ``i`` is vLLM's ``s``-th extra draft step
        after position ``i`` was verified: input ``(emb[i + s], pre_{s-1}[i])`` (the previous pass's pre-norm
        output is fed back as the hidden input, no fc), rope position ``pos[i] + s``; it attends to pass 0's keys
        at positions ``<= i`` (the head's KV cache after verification) and to passes 1..s at base ``i`` (its
        earlier draft steps). Output ``s`` has ``T - s`` rows and predicts the target's distribution at position
        ``i + 1 + s``. Gradients flow through the fed-back states.
        """
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        t = emb.shape[0]
        out, pre = self._block(emb, self.fc(aux), pos, keys, values, None)
        outs = [out]
        dev = emb.device
        for s in range(1, steps):
            n = t - s
            if n <= 0:
                break
            i = torch.arange(n, device=dev)
            parts = [torch.arange(t, device=dev)[None, :] <= i[:, None]]  # pass 0: positions <= i
            for r in range(1, s + 1):  # passes 1..s: base i itself
                parts.append(torch.arange(t - r, device=dev)[None, :] == i[:, None])
            out, pre = self._block(emb[s:s + n], pre[:n], pos[:n] + s, keys, values, torch.cat(parts, dim=1))
            outs.append(out)
        return outs


def eagle3_loss(out: torch.Tensor, target_feat: torch.Tensor, head_w: torch.Tensor, target_w: torch.Tensor,
                cand: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Soft cross-entropy of the head's draft-vocabulary distribution against the target's.

    ``out`` [T, H]: the head's normed outputs; ``target_feat`` [T, H]: the target's final (normed) hidden states
    at the positions predicted; ``head_w`` [Vd, H]: the head's lm_head (trainable, or the target's when shared);
    ``target_w`` [Vd, H]: the target's lm_head rows of the draft vocabulary (frozen). ``cand``: (draft rows, log
    importance weights) from :func:`.model.candidate_ids` (None: all ``Vd`` rows). ``mask`` [T] bool: positions
    that count (next token in the draft vocabulary). Returns loss (= ce), ce and top-1 agreement (head argmax ==
    target argmax within the scored rows) on the counted positions.
    """
    if mask is not None:
        out, target_feat = out[mask], target_feat[mask]
    if out.shape[0] == 0:
        z = out.sum() * 0.0
        return {"loss": z, "ce": z, "acc": z.detach()}
    hw = head_w if cand is None else head_w[cand[0]]
    tw = target_w if cand is None else target_w[cand[0]]
    logw = 0.0 if cand is None else cand[1].to(out.device)
    logits = (out.to(hw.dtype) @ hw.T).float()
    with torch.no_grad():
        t_logits = (target_feat.to(tw.dtype) @ tw.T).float()
        t_prob = (t_logits + logw).softmax(-1)
    logp = logits - torch.logsumexp(logits + logw, dim=-1, keepdim=True)
    ce = -(t_prob * logp).sum(-1).mean()
    acc = (logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
    return {"loss": ce, "ce": ce, "acc": acc}
