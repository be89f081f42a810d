"""The `toolkit` command: parses options and calls one function per command, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolkit.errors import ToolkitError

app = typer.Typer(
    help="Train the seeds' small image classifiers from TOML recipes, then evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATA_DIR_HELP = "Dataset root (default: $TOOLKIT_DATA_DIR, else ~/.cache/toolkit/data)."
JSON_HELP = "Print one JSON object last on stdout (progress goes to stderr)."


def _console(as_json: bool) -> Console:
    return Console(stderr=True) if as_json else Console()


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe file (recipes/fine4.toml) or name (fine4)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the recipe's epoch count."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder for run directories."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the recipe's random seed."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run directory from its last.pt."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", min=1, help="Use only the first N training images (smoke runs)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="Use only the first N test images (smoke runs)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a recipe; writes runs/<recipe>-<timestamp>/ with best.pt, last.pt, metrics.csv, curves.png."""
    from toolkit.recipes import load_recipe
    from toolkit.train import train as run_training

    if recipe is None and resume is None:
        raise ToolkitError("give a recipe (e.g. recipes/fine4.toml) or --resume RUN_DIR")
    result = run_training(
        load_recipe(recipe) if recipe and resume is None else None,
        device=device, data_dir=data_dir, out=out, epochs=epochs, seed=seed, resume=resume,
        workers=workers, train_limit=train_limit, test_limit=test_limit, console=_console(as_json),
    )
    if as_json:
        _emit(result.as_json())


@app.command()
def recipes(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Folder of recipe files (default: the bundled recipes/)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List every recipe: dataset, model, parameters, epochs and the seed's best test accuracy."""
    from toolkit.report import recipe_rows, recipes_table
    from toolkit.recipes import RECIPES_DIR

    rows = recipe_rows(directory or RECIPES_DIR)
    if as_json:
        _emit(rows)
    else:
        Console().print(recipes_table(rows))


@app.command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint or run directory (default: the latest run)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the latest run."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Test accuracy, per-class accuracy and a confusion-matrix PNG for a trained model."""
    from toolkit.checkpoint import latest_run
    from toolkit.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint or latest_run(runs), data_dir=data_dir, device=device, console=_console(as_json))
    if as_json:
        _emit(report)


def main() -> None:
    try:
        app()
    except ToolkitError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
