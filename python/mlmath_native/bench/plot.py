"""Optional bar chart of the ratios contender/ours (needs matplotlib; Agg backend, no display)."""

from __future__ import annotations

import sys


def plot_ratios(rows: list[dict], path: str, title: str = "") -> bool:
    """Draw torch/ours and numpy/ours per row into `path`; False (with a message) if no
    matplotlib. Bars above the line at 1 mean we are faster."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(
            f"matplotlib is not installed: skipping --plot {path} (pip install matplotlib)",
            file=sys.stderr,
        )
        return False

    labels = [f"{r['name']}\n{r['shape']}" for r in rows]
    series = [
        ("torch/ours", "torch_ratio", "tab:orange"),
        ("numpy/ours", "numpy_ratio", "tab:blue"),
    ]
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    for k, (label, key, color) in enumerate(series):
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        ys = [r[key] if r[key] is not None else float("nan") for r in rows]
        if all(r[key] is None for r in rows):
            continue  # contender not installed
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{y:.3g}" if y == y else "" for y in ys], fontsize=7)
    ratios = [r[key] for _, key, _ in series for r in rows if r[key] is not None]
    if ratios:  # always show the line at 1 with some room around it
        ax.set_ylim(min(0.5, 0.8 * min(ratios)), max(2.0, 1.25 * max(ratios)))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("contender time / our time (higher is better)")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
