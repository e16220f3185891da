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

    labels = [f"{r['name']}  {r['shape']}" for r in rows]
    series = [
        ("torch/ours", "torch_ratio", "tab:orange"),
        ("numpy/ours", "numpy_ratio", "tab:blue"),
    ]
    height = 0.4
    # horizontal bars, one row per case (top to bottom in table order), so labels never overlap
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, 0.42 * len(rows) + 1.2)))
    ys_pos = list(range(len(rows)))[::-1]
    for k, (label, key, color) in enumerate(series):
        if all(r[key] is None for r in rows):
            continue  # contender not installed
        pos = [y + (0.5 - k) * height for y in ys_pos]
        vals = [r[key] if r[key] is not None else float("nan") for r in rows]
        bars = ax.barh(pos, vals, height, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v == v else "" for v in vals], fontsize=7)
    ratios = [r[key] for _, key, _ in series for r in rows if r[key] is not None]
    if ratios:  # always show the line at 1 with some room around it
        ax.set_xlim(min(0.5, 0.8 * min(ratios)), max(2.0, 1.35 * max(ratios)))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("contender time / our time (right of 1: we are faster)")
    ax.set_yticks(ys_pos, labels, fontsize=8)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
