"""Figures of `relaygen calibrate` (matplotlib, Agg, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_deltas(stats: Any, path: Path, title: str = "") -> None:
    """Per-cue delta with +-1 standard error, best first; selected cues in colour."""
    plt = _plt()
    rows = sorted((s for s in stats.cues.values() if s.delta is not None), key=lambda s: s.delta, reverse=True)
    missing = len(stats.cues) - len(rows)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.2 * len(rows) + 1.2)), dpi=120)
    if rows:
        ys = list(range(len(rows)))
        colours = ["tab:orange" if s.selected else "tab:grey" for s in rows]
        ax.barh(ys, [s.delta for s in rows], xerr=[s.stderr or 0.0 for s in rows], color=colours,
                ecolor="black", error_kw={"elinewidth": 0.6, "capsize": 1.5})
        ax.set_yticks(ys, [f"{s.cue!r} ({s.occurrences})" for s in rows], fontsize=6)
        ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("delta = mean margin after cue - mean margin elsewhere (+-1 s.e.)")
    note = f"orange: selected ({sum(s.selected for s in rows)})" + (f"; {missing} cues never scored" if missing else "")
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_trace(margins: Sequence[float], regions: dict[str, list[tuple[int, int]]], path: Path,
               title: str = "", scored: Sequence[bool] | None = None, window: int = 400) -> None:
    """One trajectory's margin per token with the selected cues' post-cue regions shaded;
    a window of `window` tokens around the first region keeps long trajectories readable."""
    plt = _plt()
    spans = sorted((a, b, c) for c, sp in regions.items() for a, b in sp)
    n = len(margins)
    lo = max(0, spans[0][0] - window // 8) if spans else 0
    hi = min(n, lo + window)
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=120)
    xs = list(range(lo, hi))
    ys = [margins[k] if scored is None or scored[k] else float("nan") for k in xs]
    ax.plot(xs, ys, linewidth=0.7, color="tab:blue", drawstyle="steps-mid", label="margin p1 - p2 (small model)")
    labelled = False
    for a, b, cue in spans:
        if b <= lo or a >= hi:
            continue
        ax.axvspan(a - 0.5, b - 0.5, color="tab:orange", alpha=0.25, label=None if labelled else "post-cue region")
        ax.text(a - 0.5, 1.02, cue.strip(), fontsize=5, rotation=60, va="bottom")
        labelled = True
    ax.set_ylim(0, 1.15)
    ax.set_xlim(lo - 0.5, max(hi, lo + 1) - 0.5)
    ax.set_xlabel(f"completion token (tokens {lo}..{hi - 1} of {n})")
    ax.set_ylabel("margin")
    ax.set_title(title, fontsize=8)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
