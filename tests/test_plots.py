"""The report's figures show what the numbers say: the forest plot draws the table's differences and intervals
with a zero line, accuracy axes fit the data, losses are smoothed as stated, constants get no panel.

Figures are read back through their matplotlib artists (draw_* functions return the Figure)."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

from loragen import io
from loragen.pipeline import dnd
from loragen.report import plots
from loragen.report.runs import LoraRun
from loragen.report.sections import INTERVAL_LOSS, legend_names, lora_panels, loss_series, timing_groups
from tests.test_generator_generate import run_stage


def table_row(h: str, base: float, diffs: dict[str, list[float]], variants: dict[str, list[float]]) -> dict:
    """A table.json row as dnd.table writes it, with hand-chosen differences [d, lo, hi]."""
    row = {"heldout": h, "split": "test", "n": 400, "base": base, "nearest_dataset": "other", "train_tasks": 2,
           "generated_sd": 0.01, "generated_k": 3}
    for role, d in diffs.items():
        row[role] = base + d[0]
        row[f"{role}_diff"] = d
    row["generators"] = {"reconstruction": {"objective": "reconstruction", "condition": "prompts", "k": 3,
                                            "acc": row["generated"], "sd": 0.01, "diff": diffs["generated"],
                                            "minus_multitask": None, "train_tasks": 2}}
    for name, d in variants.items():
        row["generators"][name] = {"objective": "task", "condition": "prompts", "k": 2, "acc": base + d[0],
                                   "sd": 0.0, "diff": d, "minus_multitask": None, "train_tasks": 2}
    return row


ROWS = [
    table_row("piqa", 0.56, {"oracle": [0.031, 0.012, 0.05], "average": [-0.004, -0.02, 0.013],
                             "nearest": [-0.021, -0.045, 0.003], "generated": [0.008, 0.001, 0.016],
                             "multitask": [-0.045, -0.086, -0.007]}, {"task": [0.002, -0.01, 0.014]}),
    table_row("arc_easy", 0.52, {"oracle": [0.016, 0.001, 0.033], "average": [-0.025, -0.039, -0.012],
                                 "nearest": [-0.123, -0.149, -0.099], "generated": [-0.05, -0.067, -0.033],
                                 "multitask": [-0.26, -0.29, -0.23]}, {"task": [-0.27, -0.3, -0.24]}),
]
ROLE_KEYS = {"oracle (own LoRA)": "oracle_diff", "multi-task LoRA": "multitask_diff", "weight average": "average_diff",
             "nearest-prompt LoRA": "nearest_diff", "generated (reconstruction), k=3": "generated_diff"}


@pytest.fixture
def table(tmp_path) -> list[dict]:
    """The rows, written to and read back from a table.json (what the report and the README figure read)."""
    io.write_json(tmp_path / "table.json", {"rows": ROWS, "steps": {}})
    return json.loads((tmp_path / "table.json").read_text())["rows"]


def drawn_points(ax, labelled=None) -> dict[str, tuple[float, float, float, str]]:
    """y tick label -> (x, interval low, interval high, marker face color) of each errorbar in the axes (tick labels
    read from `labelled`, the axes that shows the shared y axis's labels)."""
    labels = {round(t.get_position()[1]): t.get_text() for t in (labelled or ax).get_yticklabels()}
    out = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            (x,), (y,) = c.lines[0].get_data()
            ((lo, ylo), (hi, yhi)), = c.lines[2][0].get_segments()
            assert ylo == yhi == y
            out[labels[round(y)]] = (x, lo, hi, c.lines[0].get_markerfacecolor())
    return out


def has_zero_line(ax, axis: str = "x") -> bool:
    data = (lambda ln: ln.get_xdata()) if axis == "x" else (lambda ln: ln.get_ydata())
    return any(list(data(ln)) == [0, 0] for ln in ax.lines)


def test_forest_draws_the_table_differences_and_intervals(table):
    fig = plots.draw_forest(dnd.forest_panels(table), dnd.FOREST_TITLE)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(table)  # one panel per held-out dataset
    for ax, row in zip(axes, table):
        assert ax.get_title().startswith(f"{row['heldout']} (test, n=400), base {row['base']:.3f}")
        assert has_zero_line(ax)
        points = drawn_points(ax, axes[0])
        expected = {label: row[key] for label, key in ROLE_KEYS.items()}
        expected["generated (task), k=2"] = row["generators"]["task"]["diff"]
        assert set(points) == set(expected)
        for label, (d, lo, hi) in expected.items():
            x, xlo, xhi, face = points[label]
            assert (x, xlo, xhi) == pytest.approx((d, lo, hi), abs=1e-12)
            assert (face == "white") == (lo <= 0 <= hi)  # hollow exactly when the interval includes 0
        # the numbers written next to the panel are the table's, as table.md prints them
        texts = {t.get_text() for t in ax.texts}
        d, lo, hi = row["nearest_diff"]
        assert f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] (other's LoRA)" in texts
        left, right = ax.get_xlim()
        assert left < min(0, min(v[1] for v in expected.values())) and right > max(0, max(v[2] for v in expected.values()))
    plt.close(fig)


def test_pipeline_writes_forest_png(table, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    written = dnd.plots(None, table, out)
    assert written == [out / "forest.png"]  # one task count per dataset: no task_count.png
    with Image.open(out / "forest.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 800


def test_forest_is_the_reports_first_figure(table, tmp_path):
    pipeline = tmp_path / "pipeline"
    io.write_json(pipeline / "table.json", {"rows": table, "steps": {}})
    out = tmp_path / "out"
    run_stage(["stage=report", f"report.runs=[{pipeline}]", f"hydra.run.dir={out}", "tracker=none"])
    text = (out / "report.md").read_text()
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert images[0].endswith("(forest.png)") and (out / "forest.png").is_file()
    assert f"`{pipeline / 'table.json'}`" in text  # no config.yaml: the numbers are table.json's


def test_accuracy_axis_fits_the_data_and_differences_have_a_zero_line():
    rows = [{"label": "base", "role": "base", "acc": 0.516, "acc_stderr": 0.010, "diff": None},
            {"label": "oracle", "role": "LoRA (own dataset)", "acc": 0.533, "acc_stderr": 0.010,
             "diff": (0.016, 0.001, 0.033)},
            {"label": "average", "role": "baseline: average", "acc": 0.491, "acc_stderr": 0.010,
             "diff": (-0.025, -0.039, -0.012)}]
    fig = plots.draw_accuracy(rows, {"accs": [0.49, 0.47], "diff": (-0.036, -0.05, -0.02)}, "acc")
    acc_ax, diff_ax = fig.axes[:2]
    left, right = acc_ax.get_xlim()
    assert 0 < left < 0.47 and 0.533 + 0.010 < right < 1  # fitted to the data, not from 0
    points = drawn_points(diff_ax, acc_ax)
    assert points["oracle"][:3] == pytest.approx((0.016, 0.001, 0.033))
    assert points["generated (mean ± sd, k=2)"][:3] == pytest.approx((-0.036, -0.05, -0.02))
    assert "base" not in points and has_zero_line(diff_ax)
    plt.close(fig)


def lora_run(name: str, losses: list[float], lr, **extra) -> LoraRun:
    history = [{"step": 10 * (i + 1), "loss": v, "lr": lr if not callable(lr) else lr(i),
                **{k: vals[i] for k, vals in extra.items()}} for i, v in enumerate(losses)]
    return LoraRun(Path("/nowhere") / name, name, history=history, fingerprint={"dataset": name.split("/")[-1]})


def test_smoothed_loss_is_the_running_mean_drawn_bold_over_faint_raw_points():
    rng = np.random.default_rng(0)
    losses = list(2.0 * np.exp(-np.arange(40) / 15) + rng.uniform(0, 0.5, 40))
    run = lora_run("lora/piqa", losses, 5e-4)
    (series,), what = loss_series([run], legend_names([run.name]))
    w = plots.smoothing_window(len(losses))
    expected = [np.mean(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]  # the last w logged points
    assert w == 4 and series.smoothed == pytest.approx(expected, abs=1e-12)
    assert f"mean of the last {w} logged points" in what
    fig = plots.draw_curves(lora_panels([run]), "LoRA")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.get_title().startswith("lora: training loss")]
    bold = [ln for ln in ax.lines if ln.get_alpha() is None]
    faint = [ln for ln in ax.lines if ln.get_alpha() == plots.RAW_ALPHA]
    assert list(bold[0].get_ydata()) == pytest.approx(expected) and list(faint[0].get_ydata()) == losses
    plt.close(fig)


def test_a_logged_interval_mean_is_drawn_as_is():
    means = [1.5, 1.2, 1.1, 0.9]
    run = lora_run("lora/piqa", [1.9, 0.8, 1.4, 0.7], 5e-4, **{INTERVAL_LOSS: means})
    (series,), what = loss_series([run], {run.name: "piqa"})
    assert series.smoothed == means and series.y == [1.9, 0.8, 1.4, 0.7] and "mean over each log interval" in what


def test_a_constant_gets_no_panel_and_is_named():
    constant = [lora_run("lora/piqa", [1.0, 0.9, 0.8], 5e-4, eval_acc=[0.50, 0.52, 0.55]),
                lora_run("lora/boolq", [1.1, 0.7, 0.6], 5e-4, eval_acc=[0.60, 0.61, 0.63])]
    fig = plots.draw_curves(lora_panels(constant), "LoRA")
    titles = [a.get_title() for a in fig.axes if a.get_visible() and a.has_data()]
    assert not any("learning rate" in t for t in titles) and any("eval accuracy" in t for t in titles)
    assert "lora: learning rate constant at 0.0005 for every run (no panel)" in fig.get_suptitle()
    acc_ax = next(a for a in fig.axes if "eval accuracy" in a.get_title())
    assert acc_ax.get_ylim()[0] > 0.4  # accuracy axes fit the data
    plt.close(fig)
    decaying = [lora_run("lora/piqa", [1.0, 0.9, 0.8], lambda i: 1e-3 / (i + 1))]
    fig = plots.draw_curves(lora_panels(decaying), "LoRA")
    assert any("learning rate" in a.get_title() for a in fig.axes if a.get_visible())
    plt.close(fig)


def test_curve_legends_sit_outside_the_data():
    runs = [lora_run(f"lora/d{i}", [1.0, 0.9, 0.8], 5e-4, eval_acc=[0.5, 0.6, 0.7]) for i in range(3)]
    fig = plots.draw_curves(lora_panels(runs), "LoRA")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    data_axes = [a for a in fig.axes if a.get_visible() and a.has_data()]
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(a.get_window_extent(renderer)) for a in data_axes)
    plt.close(fig)


def test_multitask_runs_are_named_by_the_dataset_they_leave_out():
    names = ["multitask/a+b", "multitask/a+c", "multitask/b+c"]
    assert legend_names(names) == {"multitask/a+b": "all but c", "multitask/a+c": "all but b",
                                   "multitask/b+c": "all but a"}


def test_timing_one_panel_per_dataset_each_bar_once():
    common = {"dataset": "piqa", "generator_s": 100.0, "lora": "lora/piqa", "lora_s": 60.0, "lora_steps": 100}
    rows = [{**common, "run": "generate/piqa", "generator": "generator/piqa", "generate_s": 0.3, "reach": (25, 15.0)},
            {**common, "run": "generate-task/piqa", "generator": "generator-task/piqa", "generator_s": 90.0,
             "generate_s": 0.31, "reach": (25, 15.0)}]
    ((name, bars),) = timing_groups(rows)
    assert name == "piqa" and [b[0] for b in bars] == [
        "generated: one adapter", "generated (task): one adapter", "generator: training", "generator (task): training",
        "LoRA to step 25, its first eval ≥ the acc of generated, generated (task)", "LoRA full fine-tune (100 steps)"]
    fig = plots.draw_timing([(name, bars)], "timing", "wall-clock seconds (load not recorded)")
    assert "wall-clock seconds (load not recorded)" in fig.get_suptitle()
    assert len(fig.axes[0].patches) == len(bars)  # no CPU seconds recorded: the wall bars only
    plt.close(fig)


def test_timing_draws_cpu_seconds_and_names_the_load_where_recorded():
    load = "load 1.9→2.3 / 2 cores"
    row = {"dataset": "piqa", "run": "generate/piqa", "generator": "generator/piqa", "generator_s": 100.0,
           "generator_cpu": 180.0, "generator_load": load, "generate_s": 0.3, "generate_load": None, "lora": "lora/piqa",
           "lora_s": 60.0, "lora_cpu": 110.0, "lora_load": load, "lora_steps": 100, "reach": (25, 15.0),
           "reach_cpu": 28.0}
    ((name, bars),) = timing_groups([row])
    assert [(b[1], b[3]["cpu"]) for b in bars] == [(0.3, None), (100.0, 180.0), (15.0, 28.0), (60.0, 110.0)]
    fig = plots.draw_timing([(name, bars)], "timing", "wall and CPU seconds")
    ax = fig.axes[0]
    assert sorted(round(p.get_width(), 3) for p in ax.patches) == [0.3, 15.0, 28.0, 60.0, 100.0, 110.0, 180.0]
    texts = [t.get_text() for t in ax.texts]
    assert "100 s wall, 180 s CPU" in " ".join(texts) and "0.3 s wall" in " ".join(texts)
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert sum(load in t for t in ticks) == 3 and not any("load" in t for t in ticks if "one adapter" in t)
    assert "CPU seconds (all cores)" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)


def test_heatmap_of_positive_cosines_uses_their_range():
    fig = plots.draw_heatmap(np.array([[1.0, 0.86], [0.86, 1.0]]), ["a", "b"], "t")
    (im,) = fig.axes[0].get_images()
    assert im.get_clim() == (0.85, 1.0)
    plt.close(fig)
    fig = plots.draw_heatmap(np.array([[1.0, -0.2], [-0.2, 1.0]]), ["a", "b"], "t")
    assert fig.axes[0].get_images()[0].get_clim() == (-1.0, 1.0)
    plt.close(fig)


def test_curves_with_nothing_left_to_draw_still_render(tmp_path):
    """Every panel constant or empty (a run too short to log much): one placeholder panel, no error."""
    from loragen.report.plots import Panel, Series, curves

    constant = Panel("learning rate", "", series=[Series("a", [1, 2], [5e-4, 5e-4], "lr")])
    png = curves([("lora", [constant, Panel("loss", "")])], "t", tmp_path / "c.png")
    assert png.is_file() and png.stat().st_size > 0
