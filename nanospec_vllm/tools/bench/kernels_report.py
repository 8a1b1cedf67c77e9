"""Tables of ``nanospec bench kernels``: the summary (best sparse implementation, crossover batch), the printed
tables and the markdown made from a ``--json`` file (:func:`markdown`)."""

from __future__ import annotations

from .kernels_common import HEADS, Row
from .kernels_union import union_markdown


def _summary(rows: list[Row]) -> dict:
    """Best sparse impl per shape, and per (head, active) the largest batch where it still beats ``dense``."""
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.error or r.impl in ("dense", "dense-masked") or r.mode != _main_mode(rows):
            continue
        key = (r.head, r.batch, r.active)
        if key not in best or r.median_us < best[key].median_us:
            best[key] = r
    per_shape = [{"head": h, "batch": b, "active": a, "best_impl": r.impl, "median_us": r.median_us,
                  "speedup_vs_dense": r.speedup_vs_dense} for (h, b, a), r in sorted(best.items())]
    crossover = []
    for head in sorted({k[0] for k in best}):
        vocab = HEADS[head][1]
        for active in sorted({k[2] for k in best if k[0] == head}):
            pays = [b for (h, b, a), r in best.items() if h == head and a == active and (r.speedup_vs_dense or 0) > 1]
            loses = [b for (h, b, a), r in best.items()
                     if h == head and a == active and (r.speedup_vs_dense or 0) <= 1]
            last = max(pays) if pays else None
            first_loss = min(loses) if loses else None
            crossover.append({"head": head, "active": active, "largest_batch_sparse_wins": last,
                              "smallest_batch_dense_wins": first_loss,
                              "batch_x_active_over_vocab_at_loss": (round(first_loss * active / vocab, 3)
                                                                    if first_loss else None)})
    return {"best_sparse": per_shape, "crossover": crossover}


def _main_mode(rows: list[Row]) -> str:
    return "graph" if any(r.mode == "graph" and not r.error for r in rows) else "eager"


def _print_table(rows: list[Row], head: str, mode: str) -> None:
    sel = [r for r in rows if r.head == head and r.mode == mode]
    if not sel:
        return
    impls = [i for i in ("dense", "dense-masked", "torch", "native", "triton") if any(r.impl == i for r in sel)]
    H, V = HEADS[head]
    print(f"\n{head} head (H={H}, V={V:,}), {sel[0].device}, {mode}: median us (speedup vs dense)")
    cols = ["batch", "active"] + impls
    print(" | ".join(f"{c:>20}" if c not in ("batch", "active") else f"{c:>6}" for c in cols))
    for b in sorted({r.batch for r in sel}):
        for a in sorted({r.active for r in sel}):
            cells = [f"{b:>6}", f"{a:>6}"]
            for i in impls:
                r = next((x for x in sel if x.impl == i and x.batch == b and x.active == a), None)
                if r is None:
                    cells.append(f"{'-':>20}")
                elif r.error:
                    cells.append(f"{'skipped' if r.error.startswith('skipped') else 'error':>20}")
                else:
                    sp = f" ({r.speedup_vs_dense:.1f}x)" if r.speedup_vs_dense and i != "dense" else ""
                    cells.append(f"{r.median_us:>11.1f}{sp:>9}")
            print(" | ".join(cells))



def markdown(data: dict) -> str:
    """Markdown tables (median us and speedup vs dense, per head and mode) from a ``--json`` file's content;
    a ``--union`` run gets :func:`.kernels_union.union_markdown`'s tables."""
    if any(r.get("sets") is not None for r in data["rows"]):
        return union_markdown(data)
    rows = [Row(**r) for r in data["rows"]]
    out = []
    for head in [h for h in HEADS if any(r.head == h for r in rows)]:
        for mode in ("graph", "eager"):
            sel = [r for r in rows if r.head == head and r.mode == mode]
            if not sel:
                continue
            impls = []
            for r in sel:
                if r.impl not in impls:
                    impls.append(r.impl)
            H, V = HEADS[head]
            out.append(f"\n**{head}** head (H={H}, V={V:,}), {sel[0].device}, {mode}: median us (speedup vs dense)\n")
            out.append("| batch | active | " + " | ".join(impls) + " |")
            out.append("|---:|---:|" + "---:|" * len(impls))
            for b in sorted({r.batch for r in sel}):
                for a in sorted({r.active for r in sel}):
                    cells = []
                    for i in impls:
                        r = next((x for x in sel if x.impl == i and x.batch == b and x.active == a), None)
                        if r is None:
                            cells.append("")
                        elif r.error:
                            cells.append("skipped" if r.error.startswith("skipped") else "error")
                        elif i == "dense" or r.speedup_vs_dense is None:
                            cells.append(f"{r.median_us:,.0f}" if r.median_us >= 100 else f"{r.median_us:.1f}")
                        else:
                            us = f"{r.median_us:,.0f}" if r.median_us >= 100 else f"{r.median_us:.1f}"
                            cells.append(f"{us} ({r.speedup_vs_dense:.1f}x)")
                    if any(cells):
                        out.append(f"| {b} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"

