"""The run plot and table: colours by configuration with seeds as shades, integer epochs, legend outside,
config columns, and runs that reached the target but ended below it flagged."""

import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb

from quicktrain.report import COLUMNS, RunRecord, run_rows
from quicktrain.report.plots import draw_runs, run_colours


def _run(name, config, accs):
    epochs = [
        {"epoch": e + 1, "wall": 1.5 * (e + 1), "step": 10 * (e + 1), "train_loss": 1.0, "val_loss": 1.0,
         "val_acc": a, "test_acc": a, "test_loss": 1.0}
        for e, a in enumerate(accs)
    ]
    return RunRecord(name, config, epochs)


ADAMW = {"model": "cnn", "dataset": "digits", "optimizer": "adamw", "lr": 0.003, "init": None, "precond": None,
         "boost": False}
KFAC = {**ADAMW, "optimizer": "sgd", "lr": 0.01, "precond": "kfac", "init": "ghn", "boost": True}


def test_seeds_of_one_configuration_share_a_hue_in_shades():
    runs = [_run(f"adamw-s{s}", {**ADAMW, "seed": s, "out": f"runs/a{s}"}, [0.5]) for s in range(3)]
    runs.append(_run("kfac-s0", {**KFAC, "seed": 0}, [0.5]))
    colours = run_colours(runs)
    assert len(set(colours)) == 4
    base = to_rgb(plt.get_cmap("tab10")(0))
    assert colours[0] == base and colours[3] == to_rgb(plt.get_cmap("tab10")(1))
    # shades of one hue: each channel moves from the base towards white, in seed order
    for channel in range(3):
        assert colours[0][channel] <= colours[1][channel] <= colours[2][channel]


def test_epoch_ticks_are_integers_and_the_legend_is_outside_the_axes():
    runs = [_run("a", {**ADAMW, "seed": 0}, [0.5, 0.6, 0.7]), _run("b", {**KFAC, "seed": 0}, [0.4, 0.8, 0.9])]
    fig = draw_runs(runs)
    fig.canvas.draw()
    epoch_axes = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(epoch_axes) == 2
    for ax in epoch_axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent()
    assert all(legend_box.x0 >= ax.get_window_extent().x1 for ax in fig.axes if ax.get_xlabel() == "wall time (s)")
    plt.close(fig)


def test_table_has_config_columns_and_flags_runs_that_fell_back_below_the_target():
    runs = [_run("peaked", {**KFAC, "seed": 2}, [0.7, 0.9, 0.8]), _run("steady", {**ADAMW, "seed": 0}, [0.7, 0.9])]
    rows = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in run_rows(runs, target=0.85)}
    assert rows["peaked"]["note"] == "reached 0.85, ended below" and rows["steady"]["note"] == ""
    assert (rows["peaked"]["optimizer"], rows["peaked"]["lr"], rows["peaked"]["steps"]) == ("sgd", "0.01", "30")
    assert (rows["peaked"]["seed"], rows["peaked"]["parts"], rows["steady"]["parts"]) == ("2", "ghn+kfac+boost", "-")
    assert all(row[-1] == "" for row in run_rows(runs))  # no target, no flag
