"""The report's PNG plots (matplotlib, Agg backend): the held-out forest plot, curves, accuracy, text-metric bars,
similarity heatmaps, timing bars.

Each figure is built by a `draw_*` function that returns the matplotlib Figure (tests read its artists) and saved
by the function of the same name without the prefix. Conventions, so that no figure hides or invents a finding:
- a difference to base is drawn as a point with its interval and a zero line; a filled marker means the interval
  excludes 0, a hollow one that it includes 0;
- accuracy axes fit the data (they never start at 0, which would flatten differences of a few points);
- a training loss is drawn smoothed (bold) over its raw logged points (faint); a panel whose every series is
  constant (e.g. a constant learning rate) is not drawn, its value is named in the figure's note;
- legends sit outside the axes.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402

from loragen import io  # noqa: E402

ROLE_COLORS = {"base": "#7f7f7f", "LoRA (own dataset)": "#2ca02c", "LoRA (other dataset)": "#98df8a",
               "multi-task LoRA": "#9467bd", "baseline": "#1f77b4", "generated": "#d62728",
               "generated (variant)": "#ff7f0e", "transferred": "#e377c2", "adapter": "#bcbd22"}
# forest plot roles (dnd.forest_entries' kinds)
FOREST_COLORS = {"oracle": "#2ca02c", "multitask": "#9467bd", "average": "#1f77b4", "nearest": "#17becf",
                 "generated": "#d62728", "variant": "#ff7f0e"}
DPI = 110
RAW_ALPHA = 0.25  # raw logged points under a smoothed curve


def role_group(role: str) -> str:
    """A report role's color group (a ROLE_COLORS key): `baseline: average` -> baseline, `generated-task` ->
    generated (variant)."""
    key = role.split(":")[0]
    if key.startswith("generated-"):
        return "generated (variant)"
    return key if key in ROLE_COLORS else "adapter"


def role_color(role: str) -> str:
    return ROLE_COLORS[role_group(role)]


def save(fig, path: Path) -> Path:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _diff_point(ax, x: float, y: float, lo: float, hi: float, color: str, marker: str = "o"):
    """A difference with its interval: filled when the interval excludes 0, hollow when it includes it."""
    excludes = lo > 0 or hi < 0
    return ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt=marker, color=color, mec=color,
                       mfc=color if excludes else "white", capsize=3, markersize=6, linewidth=1.4, zorder=3)


def _right_text(ax, y: float, text: str) -> None:
    """A value written right of the axes at data height y (outside the data)."""
    ax.text(1.03, y, text, transform=mtransforms.blended_transform_factory(ax.transAxes, ax.transData),
            va="center", ha="left", fontsize=7.5, family="monospace")


def _padded(lo: float, hi: float, frac: float = 0.08, floor: float = 0.005) -> tuple[float, float]:
    pad = max((hi - lo) * frac, floor)
    return lo - pad, hi + pad


def _ci_legend_handles(color: str = "#444444") -> list[Line2D]:
    return [Line2D([], [], marker="o", linestyle="", color=color, mfc=color, label="95% interval excludes 0"),
            Line2D([], [], marker="o", linestyle="", color=color, mfc="white", label="95% interval includes 0")]


# ---------------------------------------------------------------- forest plot (held-out differences to base)

def draw_forest(panels: list[tuple[str, list[dict]]], title: str, per_row: int = 3):
    """One panel per held-out dataset: each role's accuracy − base (x) with its 95% interval and a zero line.

    panels: (panel title, entries); entry: label, kind (a FOREST_COLORS key), diff [d, lo, hi], note (optional,
    appended to the value written right of the panel). Rows are the union of labels, in order, on a shared y axis;
    every panel has its own x range (always including 0)."""
    labels = list(dict.fromkeys(e["label"] for _, entries in panels for e in entries))
    ypos = {lab: len(labels) - 1 - i for i, lab in enumerate(labels)}
    cols = min(per_row, max(len(panels), 1))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 1.6, (0.3 * len(labels) + 1.3) * rows + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel_title, entries) in zip(axes.flat, panels):
        ax.axvline(0, color="black", linewidth=1, zorder=1)
        lows, highs = [0.0], [0.0]
        for e in entries:
            d, lo, hi = (float(v) for v in e["diff"])
            y = ypos[e["label"]]
            _diff_point(ax, d, y, lo, hi, FOREST_COLORS.get(e["kind"], "#7f7f7f"))
            note = f" {e['note']}" if e.get("note") else ""
            _right_text(ax, y, f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]{note}")
            lows.append(lo)
            highs.append(hi)
        ax.set_xlim(*_padded(min(lows), max(highs)))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.set_title(panel_title, fontsize=9.5)
        ax.set_xlabel("accuracy − base", fontsize=8.5)
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", labelsize=8.5)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(range(len(labels)), labels[::-1])
    axes[0, 0].set_ylim(-0.6, len(labels) - 0.4)
    handles = [Line2D([], [], color="black", linewidth=1, label="base (difference 0)"), *_ci_legend_handles()]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def forest(panels: list[tuple[str, list[dict]]], title: str, path: Path) -> Path:
    return save(draw_forest(panels, title), path)


# ---------------------------------------------------------------- training curves

@dataclass
class Series:
    run: str                        # legend entry; one color per run within a figure row
    x: list[float]
    y: list[float]
    style: str = ""                 # a second meaning shown by line style (e.g. "held out"); "" = solid
    smoothed: list[float] | None = None  # drawn bold over the raw points (drawn faint); None: the raw line only


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    xlabel: str = "optimizer step"
    logy: bool = False
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> one highlighted point (x, y)
    value_format: str = ".3g"       # how a constant is named in the figure's note


def running_mean(y: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    a = np.asarray(y, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(a)])
    idx = np.arange(1, len(a) + 1)
    start = np.maximum(idx - window, 0)
    return list((c[idx] - c[start]) / (idx - start))


def smoothing_window(n: int) -> int:
    """Logged points a loss curve is averaged over when the loop did not log interval means: a tenth of the
    points, at least 3, at most 50."""
    return max(3, min(50, n // 10))


def is_constant(panel: Panel) -> bool:
    ys = [v for s in panel.series for v in s.y]
    return bool(ys) and not panel.marks and max(ys) - min(ys) <= 1e-12 * max(1.0, abs(max(ys)))


def _identical(series: list[Series]) -> bool:
    if len(series) < 2:  # one run, or the "nothing logged" placeholder panel
        return False
    first = series[0]
    return all(s.x == first.x and s.y == first.y and s.style == first.style for s in series)


class PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers (0.6, 2, 40), which ones are labelled chosen as LogFormatter does."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def color_key(run: str) -> str:
    """What a curve's color stands for: its legend name, a multi-task run's ("all but X") by its held-out X."""
    return run.removeprefix("all but ")


def draw_curves(rows: list[tuple[str, list[Panel]]], title: str, per_row: int | None = None):
    """Training curves, one figure row per run family (e.g. lora, multitask, generator-task); each run keeps one
    color within its row, and the row's legend sits right of its last panel. Empty panels are dropped; a panel
    whose every series is one constant is dropped and the constant named in the note under the title; series
    identical across every run of a panel are drawn once ("all N runs")."""
    notes, kept = [], []
    for name, panels in rows:
        drawn = []
        for p in panels:
            if not p.series:
                continue
            if is_constant(p):
                value = format(p.series[0].y[0], p.value_format)
                notes.append(f"{name + ': ' if name else ''}{p.title} constant at {value} for every run (no panel)")
                continue
            drawn.append(p)
        if drawn:
            kept.append((name, drawn))
    if not kept:
        kept = [("", [Panel("nothing logged", "")])]
    cols = per_row or max(len(panels) for _, panels in kept)
    fig, axes = plt.subplots(len(kept), cols, figsize=(5.0 * cols + 2.6, 3.7 * len(kept) + 0.5), squeeze=False,
                             layout="constrained")
    styles = ["-", "--", ":", "-."]
    keys = list(dict.fromkeys(color_key(s.run) for _, panels in kept for p in panels for s in p.series))
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    color = {k: cmap(i % cmap.N) for i, k in enumerate(keys)}  # one color per dataset across every row
    for r, (name, panels) in enumerate(kept):
        for ax in axes[r, len(panels):]:
            ax.set_visible(False)
        handles: dict[str, Line2D] = {}
        for ax, p in zip(axes[r], panels):
            kinds = list(dict.fromkeys(s.style for s in p.series))
            dash = {k: styles[i % len(styles)] for i, k in enumerate(kinds)}
            series = p.series
            if _identical(series):
                series = [Series(f"all {len(series)} runs (identical)", series[0].x, series[0].y, series[0].style,
                                 series[0].smoothed)]
                color.setdefault(color_key(series[0].run), "#333333")
            for s in series:
                c = color[color_key(s.run)]
                few = len(s.x) <= 12
                if s.smoothed is not None:
                    ax.plot(s.x, s.y, linestyle=dash[s.style], color=c, alpha=RAW_ALPHA, linewidth=0.9,
                            marker="o" if few else None, markersize=2.5)
                    ax.plot(s.x, s.smoothed, linestyle=dash[s.style], color=c, linewidth=1.8)
                else:
                    ax.plot(s.x, s.y, linestyle=dash[s.style], color=c, linewidth=1.5, marker="o" if few else None,
                            markersize=3)
                handles.setdefault(s.run, Line2D([], [], color=c, linewidth=1.8, label=s.run))
            for k in kinds:
                if k:
                    handles.setdefault(f"style:{k}", Line2D([], [], color="#555555", linestyle=dash[k], label=k))
            if any(s.smoothed is not None for s in p.series):
                handles.setdefault("raw", Line2D([], [], color="#555555", alpha=RAW_ALPHA + 0.15, marker="o",
                                                 markersize=2.5, linewidth=0.9, label="raw logged points (faint)"))
            for label, (x, y) in p.marks.items():
                ax.scatter([x], [y], marker="*", s=140, color="gold", edgecolor="black", zorder=4)
                handles.setdefault(f"mark:{label}", Line2D([], [], marker="*", linestyle="", markersize=11,
                                                           color="gold", mec="black", label=label))
            ax.set_title("\n".join(textwrap.wrap(f"{name}: {p.title}" if name else p.title, 60)), fontsize=9.5)
            ax.set(xlabel=p.xlabel, ylabel=p.ylabel)
            if p.logy and all(v > 0 for s in p.series for v in s.y):
                ax.set_yscale("log")
                for which in ("major", "minor"):  # plain numbers (0.6, 2), not 6×10^-1
                    getattr(ax.yaxis, f"set_{which}_formatter")(PlainLogFormatter(labelOnlyBase=False,
                                                                                  minor_thresholds=(2, 0.5)))
            ax.grid(alpha=0.3)
        if len(panels) < cols:  # the row's legend fills its first empty slot
            slot = axes[r, len(panels)]
            slot.set_visible(True)
            slot.axis("off")
            slot.legend(handles=list(handles.values()), fontsize=7.5, loc="upper left", borderaxespad=0)
        else:
            axes[r, -1].legend(handles=list(handles.values()), fontsize=7.5, loc="upper left",
                               bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    head = title + ("\n" + "\n".join(notes) if notes else "")
    fig.suptitle(head, fontsize=11)
    return fig


def curves(rows: list[tuple[str, list[Panel]]], title: str, path: Path) -> Path:
    return save(draw_curves(rows, title), path)


# ---------------------------------------------------------------- accuracy per evaluated dataset

def draw_accuracy(rows: list[dict], generated: dict | None, title: str):
    """Left: accuracy of each row (label, role, acc, acc_stderr) ± 1 stderr, on an axis fitted to the data (the base
    model's accuracy dashed); the generated adapters as mean ± sd with each adapter's point. Right (when any row
    has one): accuracy − base with its paired-bootstrap 95% interval (row["diff"]: d, lo, hi), zero line drawn.
    generated: {"accs": [...], "diff": (d, lo, hi) | None} or None."""
    labels = [r["label"] for r in rows]
    accs = [float(r["acc"]) for r in rows]
    errs = [float(r["acc_stderr"]) if r.get("acc_stderr") == r.get("acc_stderr") and r.get("acc_stderr") is not None
            else 0.0 for r in rows]
    colors = [role_color(r["role"]) for r in rows]
    diffs = [r.get("diff") for r in rows]
    gen_accs = list(generated["accs"]) if generated else []
    if gen_accs:
        labels.append(f"generated (mean ± sd, k={len(gen_accs)})")
        accs.append(float(np.mean(gen_accs)))
        errs.append(float(np.std(gen_accs, ddof=1)) if len(gen_accs) > 1 else 0.0)
        colors.append(ROLE_COLORS["generated"])
        diffs.append(generated.get("diff"))
    with_diff = any(d is not None for d in diffs)
    y = np.arange(len(labels))[::-1]
    fig, axes = plt.subplots(1, 2 if with_diff else 1, sharey=True, squeeze=False, layout="constrained",
                             figsize=(12.5 if with_diff else 7.5, 0.36 * len(labels) + 2.0))
    ax = axes[0, 0]
    for yi, a, e, c in zip(y, accs, errs, colors):
        ax.errorbar([a], [yi], xerr=[e], fmt="o", color=c, mec="black", mew=0.5, capsize=3, markersize=6, zorder=3)
    if gen_accs:
        ax.scatter(gen_accs, np.full(len(gen_accs), y[-1]), marker="x", color="black", s=18, zorder=4)
    base = [float(r["acc"]) for r in rows if r["role"] == "base"]
    if len(base) == 1:
        ax.axvline(base[0], color=ROLE_COLORS["base"], linestyle="--", linewidth=1)
    lo = min([a - e for a, e in zip(accs, errs)] + gen_accs)
    hi = max([a + e for a, e in zip(accs, errs)] + gen_accs)
    left, right = _padded(lo, hi, frac=0.1, floor=0.01)
    ax.set_xlim(max(left, 0.0) if lo > 0 else left, min(right, 1.0) if hi < 1 else right)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("accuracy (± 1 stderr; generated: mean ± 1 sd over adapters)", fontsize=8.5)
    ax.set_title("accuracy (axis fitted to the data, not from 0)", fontsize=9.5)
    ax.grid(axis="x", alpha=0.3)
    if with_diff:
        ax2 = axes[0, 1]
        ax2.axvline(0, color="black", linewidth=1)
        lows, highs = [0.0], [0.0]
        for yi, d, c in zip(y, diffs, colors):
            if d is None:
                continue
            v, dlo, dhi = (float(t) for t in d)
            _diff_point(ax2, v, yi, dlo, dhi, c)
            _right_text(ax2, yi, f"{v:+.4f} [{dlo:+.4f}, {dhi:+.4f}]")
            lows.append(dlo)
            highs.append(dhi)
        ax2.set_xlim(*_padded(min(lows), max(highs)))
        ax2.set_xlabel("accuracy − base (paired-bootstrap 95% interval over documents)", fontsize=8.5)
        ax2.set_title("difference to base", fontsize=9.5)
        ax2.grid(axis="x", alpha=0.3)
    used = dict.fromkeys(role_group(r["role"]) for r in rows)
    if gen_accs:
        used["generated"] = None
    handles = [Line2D([], [], marker="o", linestyle="", color=ROLE_COLORS[n], mec="black", mew=0.5, label=n)
               for n in used]
    if gen_accs:
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="each generated adapter"))
    if len(base) == 1:
        handles.append(Line2D([], [], color=ROLE_COLORS["base"], linestyle="--", label=f"base {base[0]:.4f}"))
    if with_diff:
        handles += _ci_legend_handles()
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7.5, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=11)
    return fig


def accuracy(rows: list[dict], generated: dict | None, title: str, path: Path) -> Path:
    return save(draw_accuracy(rows, generated, title), path)


# ---------------------------------------------------------------- text metrics

def text_metric_bars(rows: list[dict], title: str, path: Path) -> Path:
    """Two panels of horizontal bars, BLEU-4 (0-100) and ROUGE-L F1 (0-1): one bar per row (label, role, bleu,
    rouge_l), colored by role. Bars start at 0: these are scores on their own scale, not differences."""
    labels = [r["label"] for r in rows]
    colors = [role_color(r["role"]) for r in rows]
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
    used = dict.fromkeys(role_group(r["role"]) for r in rows)
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLORS[n]) for n in used]
    axes[1].legend(handles, list(used), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=11)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- similarity

def draw_heatmap(matrix: np.ndarray, labels: list[str], title: str):
    """Cosine similarities. With a negative entry the scale is the diverging [-1, 1]; when every entry is >= 0 the
    scale runs from the smallest entry (rounded down to 0.05) to 1, so that a matrix of values between 0.8 and 1
    is not one block of a single color; the colorbar says which."""
    n = len(labels)
    size = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    finite = matrix[np.isfinite(matrix)]
    low = float(finite.min()) if finite.size else -1.0
    if low < 0:
        vmin, vmax, cmap = -1.0, 1.0, "RdBu_r"
    else:
        vmin, vmax, cmap = min(math.floor(low * 20) / 20, 0.95), 1.0, "viridis"
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 14:
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                dark = abs(v) > 0.6 if cmap == "RdBu_r" else (v - vmin) / (vmax - vmin) < 0.55
                text = "–" if v != v else f"{v:.2f}".replace("-0.00", "0.00")
                ax.text(j, i, text, ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    scale = "" if cmap == "RdBu_r" else f" (scale {vmin:.2f} to 1)"
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"cosine similarity of ΔW = scale·B·A{scale}")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(matrix: np.ndarray, labels: list[str], title: str, path: Path) -> Path:
    return save(draw_heatmap(matrix, labels, title), path)


# ---------------------------------------------------------------- timing

TIMING_COLORS = {"generate": ROLE_COLORS["generated"], "generator": "#ff9896", "lora": ROLE_COLORS["LoRA (own dataset)"]}
CPU_COLOR = "#303030"  # CPU seconds, drawn inside a wall-clock bar
TIMING_NAMES = {"generate": "generating one adapter", "generator": "generator training (one-off)",
                "lora": "LoRA fine-tuning"}


def draw_timing(groups: list[tuple[str, list[tuple]]], title: str, xlabel: str, per_row: int = 2):
    """Horizontal bars of seconds on a shared log axis, one panel per group (a held-out dataset): (label, wall
    seconds, kind) or (label, wall seconds, kind, {"cpu": CPU seconds or None, "load": text or None}) with kind a
    TIMING_COLORS key; CPU seconds are drawn as a dark inner bar over the wall bar, and every bar is labelled with
    its seconds (wall, CPU) and its tick label with its load where recorded; `xlabel` (what the seconds are) under the title."""
    groups = [(g, bars) for g, bars in groups if bars]
    cols = min(per_row, max(len(groups), 1))
    rows = math.ceil(max(len(groups), 1) / cols)
    longest = max((len(bars) for _, bars in groups), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols + 1.0, (0.42 * longest + 1.0) * rows + 0.8),
                             squeeze=False, sharex=True, layout="constrained")
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)

    def extra(bar: tuple) -> dict:
        return bar[3] if len(bar) > 3 and isinstance(bar[3], dict) else {}

    secs_all = [max(b[1], 1e-4) for _, bars in groups for b in bars] + \
        [max(extra(b)["cpu"], 1e-4) for _, bars in groups for b in bars if extra(b).get("cpu") is not None] or [1.0]
    labelled = any(extra(b).get("cpu") is not None or extra(b).get("load") for _, bars in groups for b in bars)
    for ax, (name, bars) in zip(axes.flat, groups):
        y = np.arange(len(bars))[::-1]
        secs = [max(b[1], 1e-4) for b in bars]
        ax.barh(y, secs, color=[TIMING_COLORS.get(b[2], "#7f7f7f") for b in bars], edgecolor="black",
                linewidth=0.4)
        cpu = [(yi, extra(b)["cpu"]) for yi, b in zip(y, bars) if extra(b).get("cpu") is not None]
        if cpu:
            ax.barh([yi for yi, _ in cpu], [max(c, 1e-4) for _, c in cpu], height=0.3, color=CPU_COLOR,
                    label="CPU seconds")
        for yi, s, b in zip(y, secs, bars):
            e = extra(b)
            parts = [f"{s:.3g} s" + (" wall" if labelled else "")]
            if e.get("cpu") is not None:
                parts.append(f"{e['cpu']:.3g} s CPU")
            end = max(s, e["cpu"]) if e.get("cpu") is not None else s
            ax.text(end, yi, " " + ", ".join(parts), va="center", fontsize=7 if labelled else 7.5)
        ax.set_yticks(y, ["\n".join(textwrap.wrap(b[0], 42) + ([f"({extra(b)['load']})"] if extra(b).get("load") else []))
                          for b in bars], fontsize=7.5)
        ax.set_ylim(-0.6, longest - 0.4)
        ax.set_title(name, fontsize=9.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("seconds (log scale)", fontsize=8)
    axes[0, 0].set_xscale("log")
    axes[0, 0].set_xlim(min(secs_all) / 2, max(secs_all) * (60 if labelled else 8))  # room for the labels
    kinds = dict.fromkeys(b[2] for _, bars in groups for b in bars)
    handles = [plt.Rectangle((0, 0), 1, 1, color=TIMING_COLORS.get(k, "#7f7f7f"), label=TIMING_NAMES.get(k, k))
               for k in kinds]
    if any(extra(b).get("cpu") is not None for _, bars in groups for b in bars):
        handles.append(plt.Rectangle((0, 0), 1, 1, color=CPU_COLOR, label="CPU seconds (all cores)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) or 1, fontsize=8, frameon=False)
    fig.suptitle(title + "\n" + "\n".join(textwrap.wrap(xlabel, 100)), fontsize=11)
    return fig


def timing(groups: list[tuple[str, list[tuple]]], title: str, xlabel: str, path: Path) -> Path:
    return save(draw_timing(groups, title, xlabel), path)


# ---------------------------------------------------------------- task count (dnd pipeline)

def draw_task_count(series: dict[str, dict[int, tuple[str, list[float]]]]):
    """One line per held-out dataset: generated (task objective) - multi-task LoRA, with its 95% interval, against
    the number of training tasks (log axis); zero is drawn, the axis is not forced to include anything else."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
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
    ax.minorticks_off()
    ax.set(title="held-out accuracy: generated (task objective) − multi-task LoRA",
           xlabel="training tasks the generator saw (log scale)", ylabel="difference in accuracy (95% CI)")
    ax.legend(fontsize=8, title="held out", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def task_count_plot(series: dict[str, dict[int, tuple[str, list[float]]]], path: Path) -> Path:
    return save(draw_task_count(series), path)
