"""The coverage replay's simulation: active-set policies (:func:`parse_policy`), one prompt's greedy speculative
chain over the real :class:`nanospec_vllm.state.ActiveVocabPool` (:func:`simulate`, see :mod:`.coverage` for the
method) and the per-group aggregation (:func:`aggregate`). Pure computation over cached inputs
(:mod:`.coverage_cache`): no engine, no model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...state import ActiveVocabPool
from ...step import verified_update
from .coverage_cache import TOP_PROMPT, TOP_TARGET

MISS_REASONS = ("never", "beyond_topk", "dropped", "other")


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
    order: str = "runtime"  # runtime: step.verified_update's (emitted, then every position's top-1, then top-2, ...)
    #                        | row: emitted, then position 1's top-1..k, position 2's, ... (before the runtime's)
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
    ``cap-C``, ``fifo``, ``ptopk`` (top-k at prompt positions), ``nodraft``, ``noprompt``, ``rank`` (the runtime's
    candidate order, the default: emitted, then every position's top-1, then top-2, ...), ``row`` (row-major:
    each position's top-1..k in turn), ``sorted`` (old pool: lowest ids win a full set),
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
            p = replace(p, order="runtime")
        elif m == "row":
            p = replace(p, order="row")
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
    """The candidates a verification adds, in the order that decides who wins a full set. ``runtime``: the
    runtime's own :func:`nanospec_vllm.step.verified_update` on the same inputs (emitted tokens, then every
    verified position's top-1, then top-2, ...); ``row``: emitted, then each position's top-k in turn."""
    if order == "runtime":
        s = torch.tensor([list(map(int, emitted))], dtype=torch.int64)
        topk = None if top is None or not top.size else torch.from_numpy(np.ascontiguousarray(top)).long()
        upd = verified_update(s, torch.tensor([len(emitted) - 1]), torch.tensor([0]), topk)
        return [int(t) for t in upd.new_ids[0].tolist() if t >= 0]
    out = [int(t) for t in emitted]
    if top is not None and top.size:
        out += [int(t) for t in top.reshape(-1)]
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
            for c in range(0, len(pt), 256):  # rank-major, as the runtime's _add_prompt_topk
                extend([int(t) for t in pt[c: c + 256].T.reshape(-1)])
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
