"""The report's PNG plots (matplotlib, Agg backend): curves, accuracy bars, text-metric bars, similarity heatmaps,
timing bars."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loragen import io  # noqa: E402

ROLE_COLORS = {"base": "#7f7f7f", "LoRA (own dataset)": "#2ca02c", "LoRA (other dataset)": "#98df8a",
               "baseline": "#1f77b4", "generated": "#d62728", "transferred": "#9467bd", "adapter": "#bcbd22"}
DPI = 110


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # label -> (x, y)
    xlabel: str = "optimizer step"
    logy: bool = False
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> one highlighted point (x, y)


def save(fig, path: Path) -> Path:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(panels: list[Panel], title: str, path: Path, per_row: int = 3) -> Path:
    """Line plots sharing the x axis meaning (training curves), `per_row` panels a row; empty panels dropped."""
    panels = [p for p in panels if p.lines]
    cols = min(per_row, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, panels):
        for label, (x, y) in p.lines.items():
            ax.plot(x, y, marker="o" if len(x) <= 12 else None, markersize=3, label=label)
        for label, (x, y) in p.marks.items():
            ax.scatter([x], [y], marker="*", s=140, color="gold", edgecolor="black", zorder=4, label=label)
        ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
        if p.logy and all(v > 0 for _, ys in p.lines.values() for v in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def accuracy_bars(rows: list[dict], generated: list[float], title: str, path: Path) -> Path:
    """Horizontal bars: one per row (label, role, acc, stderr); the generated adapters as mean ± sd with points."""
    labels = [r["label"] for r in rows]
    accs = [r["acc"] for r in rows]
    errs = [r["acc_stderr"] if r.get("acc_stderr") == r.get("acc_stderr") else 0.0 for r in rows]
    colors = [ROLE_COLORS.get(r["role"].split(":")[0], ROLE_COLORS["adapter"]) for r in rows]
    if generated:
        labels.append(f"generated (mean ± sd, k={len(generated)})")
        accs.append(float(np.mean(generated)))
        errs.append(float(np.std(generated, ddof=1)) if len(generated) > 1 else 0.0)
        colors.append(ROLE_COLORS["generated"])
    y = np.arange(len(labels))[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(labels) + 1.6))
    ax.barh(y, accs, xerr=errs, color=colors, capsize=3, edgecolor="black", linewidth=0.4)
    if generated:
        ax.scatter(generated, np.full(len(generated), y[-1]), color="black", s=12, zorder=3,
                   label="individual generated adapters")
    base = [r["acc"] for r in rows if r["role"] == "base"]
    if len(base) == 1:
        ax.axvline(base[0], color=ROLE_COLORS["base"], linestyle="--", linewidth=1, label=f"base {base[0]:.4f}")
    for yi, a, e in zip(y, accs, errs):
        ax.text(a + e, yi, f"  {a:.4f}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, min(1.05, max([a + e for a, e in zip(accs, errs)] + [0.01]) * 1.2))
    ax.set(title=title, xlabel="accuracy (fraction correct); bars ± 1 stderr, generated ± 1 sd")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ROLE_COLORS.values()]
    used = {r["role"].split(":")[0] for r in rows} | ({"generated"} if generated else set())
    legend = [(h, n) for h, n in zip(handles, ROLE_COLORS) if n in used]
    extra_h, extra_l = ax.get_legend_handles_labels()
    ax.legend([h for h, _ in legend] + extra_h, [n for _, n in legend] + extra_l, fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def text_metric_bars(rows: list[dict], title: str, path: Path) -> Path:
    """Two panels of horizontal bars, BLEU-4 (0-100) and ROUGE-L F1 (0-1): one bar per row (label, role, bleu,
    rouge_l), colored by role."""
    labels = [r["label"] for r in rows]
    colors = [ROLE_COLORS.get(r["role"].split(":")[0], ROLE_COLORS["adapter"]) for r in rows]
    y = np.arange(len(rows))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 0.42 * len(rows) + 1.8), sharey=True)
    for ax, key, name, top in ((axes[0], "bleu", "BLEU-4 (sacreBLEU, 0-100)", 100.0),
                               (axes[1], "rouge_l", "ROUGE-L F1 (0-1)", 1.0)):
        values = [float(r[key]) for r in rows]
        ax.barh(y, values, color=colors, edgecolor="black", linewidth=0.4)
        for yi, v in zip(y, values):
            ax.text(v, yi, f"  {v:.2f}" if key == "bleu" else f"  {v:.4f}", va="center", fontsize=8)
        ax.set_xlim(0, min(top * 1.05, max(values + [top / 100]) * 1.3))
        ax.set(title=name, xlabel=name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    used = dict.fromkeys(r["role"].split(":")[0] for r in rows)
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLORS.get(n, ROLE_COLORS["adapter"])) for n in used]
    axes[1].legend(handles, list(used), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=11)
    fig.tight_layout()
    return save(fig, path)


def heatmap(matrix: np.ndarray, labels: list[str], title: str, path: Path) -> Path:
    n = len(labels)
    size = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 14:
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine similarity of ΔW = scale·B·A")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def timing_bars(bars: list[tuple[str, float, str]], title: str, path: Path) -> Path:
    """Horizontal bars of seconds on a log axis: (label, seconds, kind)."""
    colors = {"generate": ROLE_COLORS["generated"], "generator": "#ff9896", "lora": ROLE_COLORS["LoRA (own dataset)"]}
    y = np.arange(len(bars))[::-1]
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(bars) + 1.6))
    secs = [max(s, 1e-4) for _, s, _ in bars]
    ax.barh(y, secs, color=[colors.get(k, "#7f7f7f") for _, _, k in bars], edgecolor="black", linewidth=0.4)
    for yi, s in zip(y, secs):
        ax.text(s, yi, f" {s:.3g} s", va="center", fontsize=8)
    ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(secs) / 2, max(secs) * 8)
    ax.set(title=title, xlabel="wall-clock seconds (log scale)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["generation (per adapter)", "generator training (one-off)", "LoRA fine-tuning"], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def task_count_plot(series: dict[str, dict[int, tuple[str, list[float]]]], path: Path) -> Path:
    """One line per held-out dataset: generated (task objective) - multi-task LoRA, with its 95% interval, against
    the number of training tasks (log axis); zero is drawn, the axis is not forced to include anything else."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    offsets = np.linspace(-0.04, 0.04, max(len(series), 1))
    for off, (heldout, points) in zip(offsets, series.items()):
        if not points:
            continue
        x = np.array(list(points), dtype=float) * (1 + off)  # a small horizontal dodge keeps the bars apart
        d = np.array([p[1] for p in points.values()])
        ax.errorbar(x, d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], marker="o", capsize=3, label=heldout)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = sorted({k for p in series.values() for k in p})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(title="held-out accuracy: generated (task objective) − multi-task LoRA",
           xlabel="training tasks the generator saw (log scale)", ylabel="difference in accuracy (95% CI)")
    ax.legend(fontsize=8, title="held out", title_fontsize=8)
    return save(fig, path)
