"""A run directory's files besides its checkpoints: recipe.toml (the recipe as it ran),
metrics.csv, curves.png and TensorBoard's event files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from toolkit.core.files import atomic_write
from toolkit.models.recipes import Recipe

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
VAL_FIELDS = ("val_loss", "val_acc")  # with a validation split (data.validation)


RECIPE_TOML = "recipe.toml"
TENSORBOARD = "tensorboard"  # the run's TensorBoard event files: tensorboard --logdir runs/


def tensorboard_writer(run_dir: Path, first_epoch: int):
    """A TensorBoard writer into ``run_dir/tensorboard/``, or None when the ``tensorboard`` package is
    not installed (the ``tensorboard`` extra). A resumed run continues the same curves."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD), purge_step=first_epoch + 1 if first_epoch else None)


def board_epoch(board, row: dict) -> None:
    step = row["epoch"]
    for key, tag in (("train_loss", "loss/train"), ("test_loss", "loss/test"), ("train_acc", "accuracy/train"),
                     ("test_acc", "accuracy/test"), ("val_loss", "loss/validation"), ("val_acc", "accuracy/validation"),
                     ("lr", "lr"), ("seconds", "seconds_per_epoch")):
        if key in row:
            board.add_scalar(tag, row[key], step)
    board.flush()


def write_recipe_toml(recipe: Recipe, path: Path, **cli) -> None:
    """The run's recipe as it ran, every value spelled out (overrides applied, model options resolved):
    ``toolkit train RUN/recipe.toml`` trains the same run again. Options that are not recipe keys
    (``--train-limit`` ...) are written as a comment, to be given again."""
    import tomli_w

    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cli.items() if v is not None)
    header = "# the resolved recipe of this run (toolkit train RUN_DIR/recipe.toml trains it again)\n"
    if given:
        header += f"# it also ran with: {given}\n"
    with atomic_write(path, "w") as f:
        f.write(header + tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True)))


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + (VAL_FIELDS if rows and "val_loss" in rows[0] else ()))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def csv_rows(path: Path) -> int:
    """The data rows of a metrics.csv (-1 when it is missing, unreadable or not a regular file: a FIFO
    would block the read)."""
    try:
        if not Path(path).is_file():
            return -1
        with open(path, newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return -1


def plot_curves(rows: list[dict], path: Path) -> None:
    from toolkit.train.report import pyplot, save_png

    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    marker = "o" if len(rows) < 20 else None  # a one-epoch run is a point, not an empty plot
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, kind in ((0, "loss"), (1, "acc")):
        for split in ("train", "val", "test"):
            if f"{split}_{kind}" in rows[0]:
                axes[axis].plot(epochs, [r[f"{split}_{kind}"] for r in rows], label={"val": "validation"}.get(split, split), marker=marker)
    axes[2].plot(epochs, [r["lr"] for r in rows], marker=marker)
    axes[2].set_yscale("log")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title != "learning rate":
            ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def write_summary(result: dict, path: Path) -> None:
    """summary.json: the run's result, written when it ends (its absence: still training, or stopped)."""
    with atomic_write(path, "w") as f:
        json.dump(result, f, indent=2)
