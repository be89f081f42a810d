"""`toolkit train`: a recipe becomes a run directory, through the training loop (toolkit.loop).

The closing summary puts the seed's write-up beside the run only when the run follows the
recipe: a run with fewer epochs or a limited data set is not "the seed's run".
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from toolkit.loop import COMPILE_MODES, RunResult, fit
from toolkit.recipes import Recipe

__all__ = ["COMPILE_MODES", "RunResult", "train", "print_summary", "differences"]


def train(recipe: Recipe | None = None, *, console: Console | None = None, overrides: list[str] | None = None, **options) -> RunResult:
    """Train ``recipe`` (or continue ``resume=RUN_DIR``); ``options`` are ``toolkit.loop.fit``'s;
    ``overrides``: the ``--set`` settings already applied to ``recipe`` (for the summary).
    A run that departs from its recipe does not carry the seed's figures into its checkpoint and
    recipe.toml: they describe the recipe as written. Prints the closing summary on the main process."""
    console = console or Console(stderr=True)
    departs = differences(recipe, {**options, "overrides": overrides})
    as_run = recipe.model_copy(update={"seed_results": None}) if recipe is not None and departs else recipe
    result = fit(as_run, console=console, **options)
    if result.main_process and result.recipe is not None:
        print_summary(recipe or result.recipe, result, console, departs)
    return result


def differences(recipe: Recipe | None, options: dict) -> list[str]:
    """How a run departs from its recipe in ways that change what the seed's numbers mean."""
    found = [f"--set {o}" for o in options.get("overrides") or []]
    epochs = options.get("epochs")
    if recipe is not None and epochs is not None and epochs != recipe.epochs:
        found.append(f"--epochs {epochs} (the recipe has {recipe.epochs})")
    for key in ("train_limit", "test_limit"):
        if options.get(key):
            found.append(f"--{key.replace('_', '-')} {options[key]:,}")
    if options.get("model") is not None:
        found.append("started from given weights (e.g. a pruned model)")
    return found


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def print_summary(recipe: Recipe, result: RunResult, console: Console, departs: list[str] | None = None) -> None:
    def fmt(v, pct=True):
        return "—" if v is None else (f"{v:.2f}%" if pct else f"{v:,}")

    sr = None if departs else recipe.seed_results
    table = Table(title=f"{recipe.name}: seed vs. this run" if sr else f"{recipe.name}: this run")
    table.add_column("")
    if sr:
        table.add_column("seed", justify="right")
    table.add_column("this run", justify="right")
    rows = [("params", sr.params if sr else None, result.params, False),
            ("best test acc", sr.best_test_acc if sr else None, result.best_test_acc, True),
            ("final test acc", sr.test_acc if sr else None, result.final_test_acc, True)]
    if result.selected_test_acc is not None:  # a validation split chose best.pt: its test accuracy is the honest figure
        rows.insert(1, ("test acc of best.pt (chosen on validation)", None, result.selected_test_acc, True))
    for label, seed, mine, pct in rows:
        table.add_row(label, *([fmt(seed, pct)] if sr else []), fmt(mine, pct))
    table.add_row("epochs", *([str(recipe.epochs)] if sr else []), str(result.epochs))
    console.print(table)
    if departs and recipe.seed_results:
        console.print(f"not compared with the seed's write-up: this run differs from the recipe ({'; '.join(departs)})")
    console.print(f"run: {result.run_dir}  ({_plural(result.epochs, 'epoch')}, {result.seconds:.1f}s)")
