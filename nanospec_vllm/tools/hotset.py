"""``nanospec build-hot-set``: a static prior for the active set, ranked by what the target itself generates.

Counts token ids in the TARGET's greedy continuations of calibration prompts
(:func:`nanospec_vllm.tools.calibration.calibration_prompts`: standard-library text and templated arithmetic,
never benchmark prompts), ranks them (continuation count, then the count in the tokens of a larger set of
calibration prompts, tokenized only, then the lower id: BPE merge order, itself a frequency prior) and writes an id file: one id per line after a
``#`` header that says how it was made. ``hot_set_path`` / ``hot_set_size`` in the ``nanospec:`` block pin its
first N ids in every request's set (see :func:`nanospec_vllm.config.load_hot_set`).

The continuations come from the coverage replay's cache (:mod:`nanospec_vllm.tools.bench.coverage_cache`, vLLM
greedy, chat template applied), so a later coverage run on the same prompts is free. Cost: one vLLM generation
pass over the prompts plus the drafter pass the cache also stores. Reads the model folder and the standard library; writes the output file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["main", "rank_ids", "tokenizer_check_header", "write_hot_set"]


def rank_ids(primary: Iterable[int], secondary: Iterable[int], vocab_size: int, size: int) -> list[int]:
    """Ids ranked by ``primary`` count (desc), then ``secondary`` count (desc), then id (asc); ``size`` of them."""
    a, b = Counter(int(i) for i in primary), Counter(int(i) for i in secondary)
    seen = [i for i in set(a) | set(b) if 0 <= i < vocab_size]
    seen.sort(key=lambda i: (-a[i], -b[i], i))
    out = seen[:size]
    if len(out) < size:
        have = set(out)
        out += [i for i in range(vocab_size) if i not in have][: size - len(out)]
    return out


def tokenizer_check_header(tok, ids: Sequence[int]) -> str:
    """The ``tokenizer-check: {id: token}`` header line (without ``# ``) that ``hot_set_path: auto`` matches against
    a target's tokenizer (:func:`nanospec_vllm.config.shipped_hot_set`): the first 8 hot ids, 5 ids spread over the
    tokenizer's whole range (tokenizers of one family share their first merges) and its EOS id."""
    n = len(tok)
    check = list(dict.fromkeys([*ids[:8], *(n * k // 6 for k in range(1, 6)), *([tok.eos_token_id] if
                                                                               tok.eos_token_id is not None else [])]))
    tokens = tok.convert_ids_to_tokens(check)
    return "tokenizer-check: " + json.dumps({str(i): t for i, t in zip(check, tokens)}, ensure_ascii=True)


def write_hot_set(path: str | Path, ids: Sequence[int], header: Sequence[str]) -> None:
    """One id per line after ``# `` comment lines (readable by :func:`nanospec_vllm.config.load_hot_set`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {h}" for h in header] + [str(int(i)) for i in ids]
    p.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanospec build-hot-set", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="target (prepared name or folder)")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b", help="drafter (the coverage cache is keyed by both)")
    ap.add_argument("--per-family", type=int, default=6, help="calibration prompts generated per family (7 families)")
    ap.add_argument("--text-prompts", type=int, default=3000,
                    help="calibration prompts whose own tokens give the secondary ranking (tokenized only)")
    ap.add_argument("--seed", type=int, default=1, help="calibration seed (coverage replays use seed 0)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--out", default="configs/hot/qwen2.5-hot.txt")
    args = ap.parse_args(argv)

    from .bench.coverage_cache import build_cache, limit_per_group, resolve_model
    from .calibration import FAMILIES, calibration_prompts

    target, draft = resolve_model(args.model), resolve_model(args.draft)
    rows = limit_per_group([(c.family, c.prompt) for c in calibration_prompts(args.per_family * len(FAMILIES), args.seed)],
                  args.per_family)
    items = build_cache(target, draft, rows, args.max_tokens, log=lambda m: print(m, file=sys.stderr, flush=True))
    cont = [int(t) for it in items for t in it["y"]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    text_rows = calibration_prompts(args.text_prompts, args.seed) if args.text_prompts else []
    prompt_toks = [int(t) for c in text_rows for t in tok.encode(c.prompt, add_special_tokens=False)]

    vocab = int(json.loads((target / "config.json").read_text())["vocab_size"])
    ids = rank_ids(cont, prompt_toks, vocab, args.size)
    n_seen = len(set(cont))
    header = [
        f"NanoSpec static hot set for {target.name} (Qwen2.5 tokenizer, vocab {vocab}): {len(ids)} ids, most useful first.",
        (f"Made by: nanospec build-hot-set --model {args.model} --per-family {args.per_family} --seed {args.seed} "
        f"--text-prompts {args.text_prompts} --max-tokens {args.max_tokens} --size {args.size} --out {args.out}"),
        (f"Date: {datetime.date.today().isoformat()}. Source: the target's greedy continuations (vLLM, chat template) "
        f"of {len(rows)} calibration prompts"),
        (f"(nanospec_vllm.tools.calibration, seed {args.seed}: standard-library text + templated arithmetic; no benchmark "
        f"text): {len(cont)} generated tokens, {n_seen} distinct ids."),
        ("Rank: count in those continuations, then count in the tokens of "
        f"{len(text_rows)} calibration prompts (same seed; {len(prompt_toks)} tokens), then lower id first."),
        tokenizer_check_header(tok, ids),
    ]
    write_hot_set(args.out, ids, header)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
