"""The head card (``card.md`` from ``card.json``) and the ``--random-weights`` heads of ``nanospec train-eagle``.

Split from :mod:`.train` (which trains and publishes): these write files only, no training. ``card.json`` has
format :data:`CARD_FORMAT`; a head folder whose card has another format or other settings is not reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..assets import cache_root
from .format import head_config, write_head
from .format3 import check_tensors3, draft_vocab, eagle3_config

__all__ = ["CARD_FORMAT", "card_md", "special_ids", "write_random_head"]

CARD_FORMAT = 1


def card_md(card: dict) -> str:
    t, d, acc = card["training"], card["data"], card["acceptance_heldout"]
    e3 = card["kind"] == "eagle3"
    dv = t.get("draft_vocab")
    lines = [f"# {'EAGLE-3' if e3 else 'EAGLE-1'} head for {card['target']}", "",
             f"- data: {d['source']}",
             *([(f"- draft vocabulary: {dv['size']} ids (d2t), {dv['data_tokens_covered']:.3f} of the training "
                f"tokens ({dv['distinct_ids_in_data']} distinct ids in the data)")] if dv else
               [(f"- draft vocabulary: the full {card['config']['draft_vocab_size']} ids through the target's "
                "lm_head (no d2t)")] if e3 else []),
             *([f"- aux layers: {card['config']['eagle_config']['eagle_aux_hidden_state_layer_ids']}"] if e3 else []),
             (f"- prompts: {d['train_prompts']} train (seed {card['settings']['seed']}), "
              f"{d['heldout_prompts']} held out; {d['data_tokens']} tokens (prompt + continuation), "
              f"{d['generated_tokens']} generated"),
             (f"- training: {t['steps']} steps, {t['token_passes']} token passes ({t['epochs']:.2f} epochs), "
              f"{t['train_wall_s'] / 60:.1f} min, {t['tokens_per_s']:.0f} tokens/s"),
             (f"- held-out acceptance (vLLM, {'eagle3' if e3 else 'eagle'}, k=3, greedy): tau {acc['tau']}, per "
              f"position {[round(x, 3) for x in acc['accept_per_pos']]}"), ""]
    curve = t["curve"]
    steps = [k for k in (curve[-1] if curve else {}) if k.startswith("acc") and k != "acc"]
    if e3:
        lines += ["| step | loss | CE (step 1) | top-1 (step 1) | " + " | ".join(f"top-1 (step {k[3:]})" for k in steps)
                  + " |", "|---|---|---|---|" + "---|" * len(steps)]
    else:
        lines += ["| step | loss | smooth-L1 | CE | top-1 |", "|---|---|---|---|---|"]
    pick = sorted({0, len(curve) - 1, *range(0, len(curve), max(1, len(curve) // 10))})
    for i in pick:
        c = curve[i]
        if e3:
            lines.append(f"| {c['step']} | {c['loss']:.4f} | {c['ce']:.3f} | {c['acc']:.3f} | "
                         + " | ".join(f"{c.get(k, float('nan')):.3f}" for k in steps) + " |")
        else:
            lines.append(f"| {c['step']} | {c['loss']:.4f} | {c['l1']:.4f} | {c['ce']:.3f} | {c['acc']:.3f} |")
    return "\n".join(lines) + "\n"


def special_ids(target: Path, tcfg: dict) -> list[int]:
    """Ids an EAGLE-3 draft vocabulary always holds: BOS/EOS/pad from the config and generation config."""
    ids: set[int] = set()
    cfgs = [tcfg]
    gen = target / "generation_config.json"
    if gen.is_file():
        cfgs.append(json.loads(gen.read_text()))
    for c in cfgs:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = c.get(k)
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, int) and 0 <= x < int(tcfg["vocab_size"]):
                    ids.add(x)
    return sorted(ids)


def write_random_head(name: str, target: Path, a: argparse.Namespace) -> Path:
    """``--random-weights``: the head format for ``target`` with seeded random weights and a card that says so."""
    from .format import random_tensors

    if a.arch == "eagle3":
        return _write_random_head3(name, target, a)
    cfg = head_config(json.loads((target / "config.json").read_text()))
    out = Path(a.out).expanduser() if a.out else cache_root() / "heads" / f"eagle1-{name}-random"
    tensors = random_tensors(cfg, seed=a.seed)
    card = {"format": CARD_FORMAT, "kind": "eagle1-random", "target": name, "target_folder": str(target),
            "seed": a.seed, "parameters": sum(int(t.numel()) for t in tensors.values()),
            "note": "random weights: acceptance is meaningless; the draft cost per step is that of a trained head"}
    md = (f"# EAGLE-1 head for {name}: RANDOM WEIGHTS (seed {a.seed})\n\nNot trained: use it to measure draft "
          "cost (`nanospec bench e2e --method eagle --draft <this folder>`), never acceptance.\n")
    return write_head(out, cfg, tensors, {"card.json": json.dumps(card, indent=1) + "\n", "card.md": md})


def _write_random_head3(name: str, target: Path, a: argparse.Namespace) -> Path:
    """EAGLE-3 ``--random-weights``: a reduced vocabulary is the lowest ``--draft-vocab`` ids (no data to count)
    plus the special ids; with ``--draft-vocab 0`` the head shares the target's lm_head."""
    from .format3 import random_tensors3

    tcfg = json.loads((target / "config.json").read_text())
    cfg = eagle3_config(tcfg, a.draft_vocab or None, a.aux_layers)
    tensors = random_tensors3(cfg, seed=a.seed)
    if a.draft_vocab:
        counts = torch.zeros(int(tcfg["vocab_size"]))
        dv = draft_vocab(counts, a.draft_vocab, special_ids(target, tcfg))
        tensors.update(d2t=dv["d2t"], t2d=dv["t2d"])
    kind = "eagle3-random" + ("" if a.draft_vocab else "-full")
    out = Path(a.out).expanduser() if a.out else cache_root() / "heads" / f"{kind.replace('-random', '')}-{name}-random"
    card = {"format": CARD_FORMAT, "kind": kind, "target": name, "target_folder": str(target), "seed": a.seed,
            "draft_vocab_size": cfg["draft_vocab_size"], "parameters": sum(int(t.numel()) for k, t in tensors.items()
                                                                           if t.is_floating_point()),
            "note": "random weights: acceptance is meaningless; the draft cost per step is that of a trained head"}
    md = (f"# EAGLE-3 head for {name}: RANDOM WEIGHTS (seed {a.seed}, draft vocabulary {cfg['draft_vocab_size']})"
          "\n\nNot trained: use it to measure draft cost (`nanospec bench e2e --method eagle3 --draft <this folder>`), "
          "never acceptance.\n")
    return write_head(out, cfg, tensors, {"card.json": json.dumps(card, indent=1) + "\n", "card.md": md},
                      check=check_tensors3)
