"""``bench e2e`` results: per-group metrics of one engine, medians over rounds and task groups, the output
identity check, and the markdown tables."""

from __future__ import annotations

import hashlib
import json
import statistics
from typing import Any

from ....vllm.metrics.transport import PATH_COUNTERS
from ...breakeven import break_even_coverage

METRICS = ("tokens_per_s", "tau", "accept_rate", "coverage", "mean_active", "draft_ms_per_step", "step_ms",
           "speed_vs_full_head", "speed_vs_no_spec", "guarded_share", "guard_fires", "break_even_coverage",
           "union_path_share", "dense_path_share")


# --------------------------------------------------------------------------------------- aggregation


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def group_metrics(g: dict[str, Any], spec: bool) -> dict[str, Any]:
    """One engine's raw measurement of one (batch, task group) -> the row metrics of that repeat."""
    sp, ns, tm = g["spec"], g["nanospec"], g["timers"]
    steps = tm.get("steps", 0)
    drafts = sp.get("vllm:spec_decode_num_drafts", 0)
    acc = sp.get("vllm:spec_decode_num_accepted_tokens", 0)
    dtok = sp.get("vllm:spec_decode_num_draft_tokens", 0)
    return {
        "tokens_per_s": g["n_tokens"] / g["wall_s"] if g["wall_s"] > 0 else None,
        "tau": 1.0 + acc / drafts if spec and drafts else None,
        "accept_rate": acc / dtok if spec and dtok else None,
        "coverage": ns["covered"] / ns["target"] if ns and ns.get("target") else None,
        "mean_active": ns["size_sum"] / ns["size_n"] if ns and ns.get("size_n") else None,
        # the break-even guard: share of NanoSpec request draft steps it sent to the full head, and its trips
        "guarded_share": ns.get("guarded", 0) / ns["planned"] if ns and ns.get("planned") else None,
        "guard_fires": ns.get("guard_fires") if ns else None,
        # the head's path per draft step (`kernel: auto` chooses it per step): shares of the steps the sparse head
        # saw that ran the union GEMM, and that it handed to vLLM's own head (dense)
        "union_path_share": _share(ns, "path_union"),
        "dense_path_share": _share(ns, "path_dense"),
        "draft_ms_per_step": 1e3 * tm["propose_s"] / steps if spec and steps else None,
        "step_ms": 1e3 * (tm["execute_s"] + tm["sample_s"]) / steps if steps else None,
        "steps": steps,
        # the counts behind ``coverage`` (target tokens at drafted positions, those active when drafted): pooled
        # over groups they compare with ``bench coverage``'s ``drafted`` / ``covered`` (tests/e2e)
        "drafted": ns.get("target") if ns else None,
        "covered": ns.get("covered") if ns else None,
        "tokens": g["n_tokens"],
        "wall_s": g["wall_s"],
        "requests": len(g["outputs"]),
        "output_hash": output_hash(g["outputs"]),
    }


def _share(ns: dict[str, Any] | None, key: str) -> float | None:
    n = sum(ns.get(k, 0) for k in PATH_COUNTERS) if ns else 0
    return ns.get(key, 0) / n if n else None


def output_hash(outputs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(outputs, separators=(",", ":")).encode()).hexdigest()[:16]


def aggregate(repeats: dict[tuple, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``{(task, config, method, batch, k): [repeat, ...]}`` (each repeat a :func:`group_metrics` dict plus
    ``round``) -> rows with medians over repeats. Speed ratios pair each repeat with the ``full-head`` /
    ``no-spec`` repeat of the same round, task, batch (and method, K for full-head); the row holds their median."""
    rows = []
    for key, reps in repeats.items():
        task, config, method, batch, k = key
        fh_key = None
        if method != "none":
            fh = "eagle-full" if config.startswith("eagle-") else "full-head"
            fh_key = (task, fh, method, batch, k)
        ns_key = (task, "no-spec", "none", batch, 0)
        by_round = {name: {r["round"]: r["tokens_per_s"] for r in repeats.get(kk, [])}
                    for name, kk in (("fh", fh_key), ("ns", ns_key)) if kk is not None}
        reps = sorted(reps, key=lambda r: r["round"])
        fh_reps = {r["round"]: r for r in repeats.get(fh_key, [])} if fh_key is not None else {}
        for r in reps:
            r["speed_vs_full_head"] = _ratio(r["tokens_per_s"], by_round.get("fh", {}).get(r["round"]))
            r["speed_vs_no_spec"] = _ratio(r["tokens_per_s"], by_round.get("ns", {}).get(r["round"]))
            f = fh_reps.get(r["round"])
            r["break_even_coverage"] = None
            if r.get("coverage") is not None and f and f.get("tau") and f.get("step_ms") and r.get("step_ms"):
                r["break_even_coverage"] = break_even_coverage(f["tau"], f["step_ms"], r["step_ms"], k)
        row: dict[str, Any] = {"task": task, "config": config, "method": method, "batch": batch, "k": k}
        for m in METRICS:
            row[m] = _median([r.get(m) for r in reps])
        row["requests"] = reps[0]["requests"] if reps else 0
        row["tokens"] = _median([r["tokens"] for r in reps])
        hashes = sorted({r["output_hash"] for r in reps})
        row["output_hash"] = hashes[0] if len(hashes) == 1 else hashes
        row["repeats"] = reps
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, method, batch, K): the median over task groups of each metric (task ``median``)."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["config"], r["method"], r["batch"], r["k"]), []).append(r)
    out = []
    for (config, method, batch, k), rs in by.items():
        s: dict[str, Any] = {"task": "median", "config": config, "method": method, "batch": batch, "k": k,
                             "groups": len(rs)}
        for m in METRICS:
            s[m] = _median([r.get(m) for r in rs])
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------- markdown

COLUMNS = (("tokens_per_s", "tok/s", "{:.2f}"), ("tau", "tau", "{:.2f}"), ("coverage", "coverage", "{:.1%}"),
           ("mean_active", "mean active", "{:.0f}"), ("draft_ms_per_step", "draft ms/step", "{:.1f}"),
           ("step_ms", "step ms", "{:.1f}"), ("speed_vs_full_head", "speed vs full-head", "{:.2f}x"),
           ("break_even_coverage", "break-even coverage", "{:.1%}"), ("guarded_share", "guarded", "{:.1%}"),
           ("union_path_share", "union path", "{:.0%}"), ("dense_path_share", "vLLM's head (dense path)", "{:.0%}"))


def _fmt(v: Any, f: str) -> str:
    return "-" if v is None else f.format(v)


#: ``--compact``: the columns a reader decides from
COMPACT = ("tokens_per_s", "tau", "coverage", "mean_active", "speed_vs_full_head", "guarded_share")


def render_markdown(data: dict[str, Any], compact: bool = False) -> str:
    """One table per (method, K, batch): rows = task groups + median, columns per configuration (metrics that
    are empty for a configuration, e.g. coverage without NanoSpec, are left out). ``no-spec`` joins every table."""
    h = data.get("header", {})
    rows = list(data.get("rows", []))
    summ = data.get("summary") or summarize(rows)
    allrows = rows + summ
    lines = ["# nanospec bench e2e", ""]
    if h:
        mach = h.get("machine", {})
        lines += [f"- command: `{h.get('command', '')}`", f"- date: {h.get('date', '')}",
                  (f"- machine: {mach.get('cpu', '?')} ({mach.get('cpu_count', '?')} cores), load average "
                  f"{mach.get('load_start')} at start, {mach.get('load_end')} at end"),
                  (f"- target {h.get('models', {}).get('target')}, drafter {h.get('models', {}).get('draft')}; "
                  f"{h.get('settings', {}).get('max_tokens')} tokens, greedy, {h.get('settings', {}).get('repeats')} "
                  "repeats (rounds, order rotating); medians over repeats, speed = median of per-round ratios"),
                  f"- versions: {json.dumps(h.get('versions', {}))}", ""]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows)) + ["median"]
    tables = sorted({(r["method"], r["k"], r["batch"]) for r in rows if r["method"] != "none"},
                    key=lambda t: (str(t[0]), t[1], t[2]))
    if not tables:  # only no-spec was run
        tables = sorted({("none", 0, r["batch"]) for r in rows}, key=lambda t: t[2])
    for method, k, batch in tables:
        def pick(config: str, task: str, method=method, k=k, batch=batch) -> dict[str, Any] | None:
            for r in allrows:
                if r["config"] == config and r["task"] == task and r["batch"] == batch and (
                        r["method"] == "none" or (r["method"] == method and r["k"] == k)):
                    return r
            return None

        cols = []
        for c in configs:
            present = [pick(c, t) for t in tasks]
            if not any(present):
                continue
            for key, label, f in COLUMNS:
                if compact and key not in COMPACT:
                    continue
                if any(p is not None and p.get(key) is not None for p in present):
                    cols.append((c, key, label, f))
        title = f"## {method}, K={k}, batch {batch}" if method != "none" else f"## no speculation, batch {batch}"
        lines += [title, "", "| task | " + " | ".join(f"{c} {label}" for c, _, label, _ in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for t in tasks:
            cells = []
            for c, key, _, f in cols:
                p = pick(c, t)
                cells.append(_fmt(None if p is None else p.get(key), f))
            name = f"**{t}**" if t == "median" else t
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    mm = data.get("mismatches") or []
    if mm:
        against = sorted({m.get("against", "no-spec") for m in mm})
        lines += [(f"**{len(mm)} OUTPUT MISMATCHES of NanoSpec configurations** (against {', '.join(against)}; "
                  "see the JSON `mismatches`)."), ""]
    vm = data.get("spec_vs_no_spec") or []
    if vm:
        lines += [(f"vLLM's own speculation (NanoSpec off) differs from no-spec on {len(vm)} outputs (JSON "
                  "`spec_vs_no_spec`): not attributable to NanoSpec, whose configurations are compared with "
                  "the same speculation without NanoSpec."), ""]
    for e in data.get("errors") or []:
        lines.append(f"- error: {e}")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------- identity

FULL_HEAD_CONFIGS = ("full-head", "eagle-full")


def _twin(name: str) -> str:
    """The NanoSpec-off configuration a NanoSpec configuration must match token for token."""
    return "eagle-full" if name.startswith("eagle-") else "full-head"


def check_identity(raw: dict[tuple, dict[int, dict[str, Any]]]) -> tuple[list[dict[str, Any]], bool]:
    """Greedy output identity, per batch and task, for every engine and round.

    A NanoSpec configuration is compared with its twin without NanoSpec (same method and K: ``full-head`` or
    ``eagle-full``, first round it ran), which is NanoSpec's own guarantee; without a twin in the run, with
    ``no-spec``. The full-head configurations (vLLM's own speculation) are compared with ``no-spec``. Each
    difference says what it was compared ``against``; :func:`split_mismatches` separates NanoSpec's from vLLM's.
    A missing output is a difference too (``"missing"``: ``"output"`` when the engine lacks a (task, batch) group
    or a prompt's output that its reference has, ``"reference"`` for the reverse, ``"all outputs"`` for an engine
    with no finished round while others have one).
    Returns ``(differences, checked)``; ``checked`` is False when nothing had a reference.
    """
    refs: dict[tuple, tuple[tuple, int]] = {}
    no_spec = next((u for u in raw if u[0] == "no-spec" and raw[u]), None)
    for unit in raw:
        twin = (_twin(unit[0]), unit[1], unit[2])
        if unit[0] == "no-spec":
            continue
        if unit[0] not in FULL_HEAD_CONFIGS and raw.get(twin):
            refs[unit] = (twin, min(raw[twin]))
        elif no_spec is not None:
            refs[unit] = (no_spec, min(raw[no_spec]))
    if no_spec is not None and len(raw[no_spec]) > 1:
        refs[no_spec] = (no_spec, min(raw[no_spec]))  # later no-spec rounds against the first
    bad: list[dict[str, Any]] = []
    if any(raw.values()):  # an engine with no finished round: nothing of it can be compared
        for unit, rounds in raw.items():
            if not rounds:
                ref_unit = refs.get(unit, (None,))[0]
                bad.append({"config": unit[0], "method": unit[1], "k": unit[2], "round": None,
                            "against": None if ref_unit is None else ref_unit[0], "task": None, "batch": None,
                            "prompt": None, "missing": "all outputs"})
    for unit, (ref_unit, ref_round) in refs.items():
        ref = {(g["task"], g["batch"]): g["outputs"] for g in raw[ref_unit][ref_round]["groups"]}
        for rnd, res in raw[unit].items():
            if unit == ref_unit and rnd == ref_round:
                continue
            got_groups = {(g["task"], g["batch"]): g["outputs"] for g in res["groups"]}
            for key in list(dict.fromkeys([*ref, *got_groups])):
                got, want = got_groups.get(key), ref.get(key)
                where = {"config": unit[0], "method": unit[1], "k": unit[2], "round": rnd, "against": ref_unit[0],
                         "task": key[0], "batch": key[1]}
                if got is None or want is None:
                    bad.append(dict(where, prompt=None, missing="output" if got is None else "reference"))
                    continue
                for i in range(max(len(got), len(want))):
                    if i >= len(got) or i >= len(want):
                        bad.append(dict(where, prompt=i, missing="output" if i >= len(got) else "reference"))
                        continue
                    g, w = got[i], want[i]
                    if g != w:
                        pos = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                        bad.append(dict(where, prompt=i, first_diff=pos, len=len(g), len_ref=len(w)))
    return bad, bool(refs)


def split_mismatches(bad: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(failures, vllm)``: differences NanoSpec is answerable for (a NanoSpec configuration against its twin,
    or against no-spec when no twin ran; no-spec against itself) and every missing output (an identity that
    could not be checked), then the differences of vLLM's own speculation (a full-head configuration's outputs
    against no-spec)."""
    def is_vllm(m: dict[str, Any]) -> bool:
        return m["config"] in FULL_HEAD_CONFIGS and not m.get("missing")

    return [m for m in bad if not is_vllm(m)], [m for m in bad if is_vllm(m)]
