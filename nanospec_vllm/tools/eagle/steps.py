"""One training step's pieces for ``nanospec train-eagle`` (:mod:`.train` runs the loop and the pipeline).

* :class:`Sampler`: the deterministic stream of sample indices, ~``tokens`` per step, reshuffled per epoch;
* :func:`micro`: the loss of one sample for an EAGLE-1 head (smooth-L1 + soft cross-entropy) or an EAGLE-3
  head (soft cross-entropy over the draft vocabulary), unrolled over ``--unroll`` draft steps;
* :class:`Vocab3`: the lm_head rows and id map an EAGLE-3 step needs;
* :func:`measure_equivalence`: loss and gradient of the sampled vs the full-vocabulary cross-entropy.

CPU only; allocates per sample (the features of one sample, its logits over the candidate rows).
"""

from __future__ import annotations

import argparse
import time

import torch

from .model import candidate_ids, eagle_loss
from .model3 import Eagle3Head, eagle3_loss

__all__ = ["Sampler", "Vocab3", "measure_equivalence", "micro"]


class Sampler:
    """Deterministic stream of sample indices (reshuffled every epoch) grouped into ~``tokens`` per step."""

    def __init__(self, lengths: list[int], tokens: int, seed: int):
        self.lengths, self.tokens = lengths, tokens
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.epoch = -1
        self.seen = 0

    def step(self) -> list[int]:
        out, n = [], 0
        while n < self.tokens:
            if not self.order:
                self.order = torch.randperm(len(self.lengths), generator=self.g).tolist()
                self.epoch += 1
            i = self.order.pop()
            out.append(i)
            n += self.lengths[i]
        self.seen += n
        return out


def _sample_tensors(feats: dict, i: int, emb: torch.Tensor, max_len: int):
    s, e = int(feats["offsets"][i]), int(feats["offsets"][i + 1])
    e = min(e, s + max_len + 1)
    ids, f = feats["ids"][s:e], feats["features"][s:e]
    # position j: input (embed(t[j+1]), f[j]); target f[j+1]
    return emb[ids[1:]], f[:-1], f[1:], torch.arange(e - s - 1), ids


class Vocab3:
    """What an EAGLE-3 step needs besides the head: the target's lm_head rows of the draft vocabulary
    (``target_w``, frozen; also the head's lm_head when it has none of its own) and target id -> draft row
    (``row_of``; -1: not in the draft vocabulary; None: the full vocabulary)."""

    def __init__(self, lm_head: torch.Tensor, vocab: dict | None):
        self.full = vocab is None
        self.target_w = lm_head if vocab is None else lm_head[vocab["ids"]].contiguous()
        self.rows = self.target_w.shape[0]
        self.row_of = None
        if vocab is not None:
            self.row_of = torch.full((lm_head.shape[0],), -1, dtype=torch.int64)
            self.row_of[vocab["ids"]] = torch.arange(len(vocab["ids"]))


def _micro3(head: Eagle3Head, feats, i, emb, ctx: Vocab3, a, g, full: bool = False) -> dict[str, torch.Tensor]:
    """EAGLE-3 loss on one sample: position j has input (embed(t[j+1]), aux[j]) and target the target's
    distribution at j+1 (final feature f[j+1]); draft step s (training-time test) predicts j+1+s."""
    s, e = int(feats["offsets"][i]), int(feats["offsets"][i + 1])
    e = min(e, s + a.max_len + 1)
    ids = feats["ids"][s:e]
    aux, fout, em = feats["aux"][s:e - 1].float(), feats["features"][s + 1:e], emb[ids[1:]].float()
    pos = torch.arange(e - s - 1)
    labels = torch.cat([ids[2:], ids.new_full((1,), -1)])  # the next token at each position (-1: beyond the end)
    if ctx.full:
        mask = labels >= 0
        rows = labels[mask]
    else:
        rows = torch.where(labels >= 0, ctx.row_of[labels.clamp(min=0)], -1)
        mask = rows >= 0
        rows = rows[mask]
    unroll = max(1, a.unroll)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        preds = head.forward_unrolled(em, aux, pos, unroll)
    cand = None if full else candidate_ids(rows, ctx.rows, a.neg, g)
    head_w = ctx.target_w if getattr(head, "lm_head", None) is None else head.lm_head.weight
    out = eagle3_loss(preds[0].float(), fout, head_w, ctx.target_w, cand, mask)
    if len(preds) > 1:  # extra draft steps, weighted 0.5^s as in EAGLE-1's --unroll
        out = dict(out)
        for k, pred in enumerate(preds[1:], start=1):
            r = eagle3_loss(pred.float(), fout[k:], head_w, ctx.target_w, cand, mask[k:])
            out["loss"] = out["loss"] + 0.5 ** k * r["loss"]
            out[f"acc{k + 1}"] = r["acc"]
    return out


def micro(head, feats, i, emb, lm_head, a, g, full: bool = False) -> dict[str, torch.Tensor]:
    if isinstance(head, Eagle3Head):
        return _micro3(head, feats, i, emb, lm_head, a, g, full)
    e, fin, fout, pos, ids = _sample_tensors(feats, i, emb, a.max_len)
    fin = fin.float()
    if a.noise > 0:
        fin = fin + (torch.rand(fin.shape, generator=g) - 0.5) * (2 * a.noise)
    unroll = max(1, getattr(a, "unroll", 1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        preds = head.forward_unrolled(e.float(), fin, pos, unroll) if unroll > 1 else [head(e.float(), fin, pos)]
    cand = None if full else candidate_ids(ids[2:], lm_head.shape[0], a.neg, g)
    out = eagle_loss(preds[0].float(), fout.float(), lm_head, a.ce_weight, cand)
    if len(preds) > 1:  # extra draft steps, weighted 0.5^s: the first draft position matters most
        tot = {k: v * 1.0 for k, v in out.items()}
        for s, pred in enumerate(preds[1:], start=1):
            r = eagle_loss(pred.float(), fout[s:].float(), lm_head, a.ce_weight, cand)
            tot["loss"] = tot["loss"] + 0.5 ** s * r["loss"]
            tot[f"acc{s + 1}"] = r["acc"]
        out = tot
    return out


def _grad_vector(head) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])


def measure_equivalence(head, feats, idx, emb, lm_head, a, seed: int) -> dict:
    """Loss and gradient of the restricted vs the full-vocabulary cross-entropy on the same samples.

    Samples are cut to 256 positions and the feature noise is off, so both losses see the same inputs and the
    full-vocabulary logits stay small in memory (~150 MB per sample).
    """
    a = argparse.Namespace(**dict(vars(a), max_len=min(a.max_len, 256), noise=0.0))
    out = {}
    for full in (True, False):
        head.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(seed)
        tot = {"ce": 0.0, "acc": 0.0}
        t0 = time.perf_counter()
        for i in idx:
            r = micro(head, feats, i, emb, lm_head, a, g, full=full)
            (r["ce"] / len(idx)).backward()
            tot["ce"] += r["ce"].item() / len(idx)
            tot["acc"] += r["acc"].item() / len(idx)
        key = "full" if full else "restricted"
        out[key] = dict(tot, wall_s=time.perf_counter() - t0, grad=_grad_vector(head).clone())
    gf, gr = out["full"].pop("grad"), out["restricted"].pop("grad")
    out["grad_cosine"] = float(torch.nn.functional.cosine_similarity(gf, gr, dim=0))
    out["grad_norm_ratio"] = float(gr.norm() / gf.norm())
    head.zero_grad(set_to_none=True)
    return out
