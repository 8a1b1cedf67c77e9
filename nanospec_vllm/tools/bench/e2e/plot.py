"""``bench e2e --markdown R.json --plot R.png``: tokens/s per task group and configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_tokens_per_s(data: dict[str, Any], png: Path) -> None:
    """One panel per (method, K, batch): grouped bars of tokens/s per task group (and the median), one bar per
    configuration (no-spec in every panel of its batch size). Needs matplotlib (the ``test``/``bench`` extras)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"] + list(data.get("summary") or [])
    panels = sorted({(r["method"], r["k"], r["batch"]) for r in rows if r["method"] != "none"},
                    key=lambda t: (t[0], t[2], t[1])) or sorted({("none", 0, r["batch"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (method, k, batch) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["batch"] == batch and (r["config"] == "no-spec" or (r["method"], r["k"]) == (method, k))]
        configs = list(dict.fromkeys(r["config"] for r in sel))
        tasks = [t for t in dict.fromkeys(r["task"] for r in sel) if t != "median"] + ["median"]
        width = 0.8 / max(1, len(configs))
        for j, c in enumerate(configs):
            vals = [next((r["tokens_per_s"] for r in sel if r["config"] == c and r["task"] == t), 0.0) for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{method}, K={k}, batch {batch}" if method != "none" else f"batch {batch}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(configs))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
