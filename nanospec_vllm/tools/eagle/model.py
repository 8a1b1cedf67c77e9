"""The EAGLE-1 head as a plain PyTorch module, computing what vLLM's ``EagleLlamaForCausalLM`` computes.

vLLM (``model_executor/models/llama_eagle.py`` + ``llama.py``), per position i of a sequence:
``x = fc(cat(embed(t[i+1]), f[i]))``; ``r = x + attn(x)`` (the first input norm is an identity; causal attention
over the head's own earlier positions, rope at position i, GQA); ``out = r + mlp(rmsnorm(r))``; no final norm.
``out`` is both the head's next feature and, through the target's lm_head, its logits. Parameter names equal the
stored checkpoint names (:mod:`.format`), so ``state_dict()`` is the checkpoint.

Also the training loss (:func:`eagle_loss`): smooth-L1 between ``out[i]`` and the target's feature ``f[i+1]``
plus ``ce_weight`` x soft cross-entropy between the head's and the target's next-token distributions through
the frozen lm_head, either over the full vocabulary or over a candidate subset of lm_head rows (the batch's
actual next tokens plus uniformly sampled ids; :func:`candidate_ids`). CPU-only cost notes are in
:mod:`.train`. No vLLM import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EagleHead", "candidate_ids", "eagle_loss"]


class _Attn(nn.Module):
    def __init__(self, h: int, nh: int, nkv: int, hd: int):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(h, nh * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)


class _Mlp(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.self_attn = _Attn(h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
        self.mlp = _Mlp(h, cfg["intermediate_size"])
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.ones(h))


def attend(a: nn.Module, xin: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
           values: list[torch.Tensor], mask: torch.Tensor | None, rope) -> torch.Tensor:
    """The attention of one EAGLE decoder layer (EAGLE-1 and EAGLE-3 heads): q/k/v of ``xin`` [t, *], ``rope`` at
    ``pos``, this pass's keys/values appended to ``keys``/``values``; ``mask`` [t, all keys] (None: causal over
    this pass only). Returns ``o_proj`` of the attention output, [t, H]."""
    t = xin.shape[0]
    q = a.q_proj(xin).view(t, a.nh, a.hd).transpose(0, 1)
    k = a.k_proj(xin).view(t, a.nkv, a.hd).transpose(0, 1)
    v = a.v_proj(xin).view(t, a.nkv, a.hd).transpose(0, 1)
    q, k = rope(q, pos), rope(k, pos)
    keys.append(k)
    values.append(v)
    if mask is None:
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
    else:
        kk, vv = torch.cat(keys, dim=1), torch.cat(values, dim=1)
        o = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask, enable_gqa=True)[0]
    return a.o_proj(o.transpose(0, 1).reshape(t, a.nh * a.hd))


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"rope type {rp.get('rope_type')!r} is not supported by the trainer")
    if cfg.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported by the trainer")
    return float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)


class EagleHead(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        h = cfg["hidden_size"]
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([_Layer(cfg)])
        self.eps = float(cfg["rms_norm_eps"])
        hd = cfg["head_dim"]
        self.register_buffer("inv_freq", 1.0 / (_rope_theta(cfg) ** (torch.arange(0, hd, 2).float() / hd)),
                             persistent=False)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # neox style (rotate halves), as vLLM's Llama rotary embedding
        freqs = pos.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _block(self, x: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
               mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer on inputs ``x`` [n, H] at rope positions ``pos``. This pass's keys/values are
        appended to ``keys``/``values``; ``mask`` [n, all keys] (None: causal over this pass only)."""
        layer = self.layers[0]
        a = layer.self_attn
        r = x + attend(a, x, pos, keys, values, mask, self._rope)
        rf = r.float()
        n = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + self.eps)).to(r.dtype)
        n = n * layer.post_attention_layernorm.weight.to(r.dtype)
        m = layer.mlp
        return r + m.down_proj(F.silu(m.gate_proj(n)) * m.up_proj(n))

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``emb`` (embedding of the next token), ``feat`` [T, H] and ``pos`` [T] for one sequence -> [T, H]."""
        return self._block(self.fc(torch.cat([emb, feat], dim=-1)), pos, [], [], None)

    def forward_unrolled(self, emb: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor,
                         steps: int) -> list[torch.Tensor]:
        """The draft loop as vLLM runs it, for every position at once ("training-time test").

        Pass 0 is :meth:`forward`. Pass ``s`` >= 1 at base position ``i`` is the ``s``-th extra draft step after
        position ``i`` was verified: input ``(emb[i + s], out_{s-1}[i])`` (the previous pass's output is fed back
        as the feature, as vLLM feeds the head its own output), rope position ``pos[i] + s``; it attends to pass
        0's keys at positions ``<= i`` (what the head's KV cache holds after verification) and to the keys of
        passes 1..s at base ``i`` (the earlier draft steps). Output ``s`` has ``T - s`` rows and predicts the
        feature at ``i + 1 + s``. Gradients flow through the fed-back features.
        """
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        t = emb.shape[0]
        outs = [self._block(self.fc(torch.cat([emb, feat], dim=-1)), pos, keys, values, None)]
        dev = emb.device
        for s in range(1, steps):
            n = t - s
            if n <= 0:
                break
            x = self.fc(torch.cat([emb[s:s + n], outs[-1][:n].to(emb.dtype)], dim=-1))
            i = torch.arange(n, device=dev)
            m0 = torch.arange(t, device=dev)[None, :] <= i[:, None]  # pass 0: positions <= i
            parts = [m0]
            for r in range(1, s + 1):  # passes 1..s: only base i itself
                parts.append(torch.arange(t - r, device=dev)[None, :] == i[:, None])
            outs.append(self._block(x, pos[:n] + s, keys, values, torch.cat(parts, dim=1)))
        return outs


def candidate_ids(next_ids: torch.Tensor, vocab: int, n_random: int,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_head rows for a sampled softmax and their log importance weights.

    Rows: the actual next tokens (weight 1) plus up to ``n_random`` uniform other ids, each standing for
    ``(vocab - positives) / negatives`` rows (log weight ``log`` of that), so that both partition functions and the
    cross-entropy sum over the vocabulary are estimated without bias. Sorted by id.
    """
    pos = torch.unique(next_ids.flatten())
    rnd = torch.unique(torch.randint(0, vocab, (n_random,), generator=g))
    neg = rnd[~torch.isin(rnd, pos)]
    ids = torch.cat([pos, neg])
    logw = torch.zeros(len(ids))
    if len(neg):
        logw[len(pos):] = float(torch.log(torch.tensor((vocab - len(pos)) / len(neg))))
    order = torch.argsort(ids)
    return ids[order], logw[order]


def eagle_loss(pred: torch.Tensor, target_feat: torch.Tensor, lm_head: torch.Tensor, ce_weight: float = 0.1,
               cand: tuple[torch.Tensor, torch.Tensor] | None = None,
               mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """EAGLE-1 loss on [T, H] predictions vs the target's next features (``lm_head`` frozen, [V, H]).

    ``cand``: (lm_head rows, their log importance weights) from :func:`candidate_ids` for a sampled softmax
    (None: the full vocabulary; all weights 0 with all rows gives exactly the full loss). ``mask`` [T] bool: positions
    that count for the cross-entropy (all count for smooth-L1). Returns loss, l1, ce and top-1 agreement
    (head argmax == target argmax within the scored rows).
    """
    l1 = F.smooth_l1_loss(pred.float(), target_feat.float())
    w = lm_head if cand is None else lm_head[cand[0]]
    logw = 0.0 if cand is None else cand[1].to(pred.device)
    p_sel, t_sel = (pred, target_feat) if mask is None else (pred[mask], target_feat[mask])
    logits = (p_sel.to(w.dtype) @ w.T).float()
    with torch.no_grad():
        t_logits = (t_sel.to(w.dtype) @ w.T).float()
        t_prob = (t_logits + logw).softmax(-1)  # = weight x p(row), weights summing the vocabulary
    logp = logits - torch.logsumexp(logits + logw, dim=-1, keepdim=True)
    ce = -(t_prob * logp).sum(-1).mean()
    acc = (logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
    return {"loss": l1 + ce_weight * ce, "l1": l1, "ce": ce, "acc": acc}
