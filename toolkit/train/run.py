"""`toolkit train`: a recipe becomes a run directory, through the training loop (toolkit.train.loop).

The closing summary puts the recipe's write-up beside the run only when the run follows the
recipe: a run with fewer epochs or a limited data set is not "the write-up's run".
"""

from __future__ import annotations

import io
import json
import statistics
from datetime import datetime
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.core.errors import ToolkitError, cut, shown
from toolkit.core.files import atomic_write, make_dir
from toolkit.train.loop import fit_epochs, pick_device, run_to_end
from toolkit.train.state import COMPILE_MODES, RunResult
from toolkit.models.recipes import MAX_SEED, Recipe

MAX_SEEDS = 64  # runs one --seeds trains: each is a whole training

__all__ = ["COMPILE_MODES", "RunResult", "train", "train_seeds", "print_summary", "differences"]


def train(recipe: Recipe | None = None, *, console: Console | None = None, overrides: list[str] | None = None, **options) -> RunResult:
    """Train ``recipe`` (or continue ``resume=RUN_DIR``); ``options`` are ``toolkit.train.loop.fit``'s;
    ``overrides``: the ``--set`` settings already applied to ``recipe`` (for the summary).
    A run that departs from its recipe does not carry the write-up's figures into its checkpoint and
    recipe.toml: they describe the recipe as written. Prints the closing summary on the main process."""
    return run_to_end(train_epochs(recipe, console=console, overrides=overrides, **options))


def train_epochs(recipe: Recipe | None = None, *, console: Console | None = None, overrides: list[str] | None = None, **options):
    """``train`` as a generator (``toolkit.train.loop.fit_epochs``): yields per queued epoch, returns the RunResult."""
    console = console or Console(stderr=True)
    departs = differences(recipe, {**options, "overrides": overrides})
    as_run = recipe.model_copy(update={"seed_results": None}) if recipe is not None and departs else recipe
    result = yield from fit_epochs(as_run, console=console, **options)
    if result.main_process and result.recipe is not None:
        print_summary(recipe or result.recipe, result, console, departs)
    return result


def differences(recipe: Recipe | None, options: dict) -> list[str]:
    """How a run departs from its recipe in ways that change what the write-up's numbers mean."""
    found = [f"--set {cut(o)}" for o in options.get("overrides") or []]  # a 120 KB value made rich's wrapping quadratic
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
    table = Table(title=f"{recipe.name}: write-up vs. this run" if sr else f"{recipe.name}: this run")
    table.add_column("")
    if sr:
        table.add_column("write-up", justify="right")
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
        console.print(f"not compared with the write-up: this run differs from the recipe ({'; '.join(departs)})")
    console.print(f"run: {result.run_dir}  ({_plural(result.epochs, 'epoch')}, {result.seconds:.1f}s)")


class _Prefixed(io.TextIOBase):
    """A text stream that starts every line with ``prefix`` (one seed's lines among several)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_start else "") + piece)
            self.at_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]: two to ``MAX_SEEDS`` distinct whole numbers from 0 to ``MAX_SEED``, written
    in ASCII digits (no sign, no underscore, no other script's digits: Python's int() takes all three)."""
    if not re.fullmatch(r"[0-9]{1,20}(,[0-9]{1,20})*", text.replace(" ", ""), flags=re.ASCII):
        raise ToolkitError(f"--seeds takes whole numbers in the digits 0-9 (up to 20 of them) separated by commas (e.g. 1,2,3), not {shown(text)}")
    seeds = [int(part) for part in text.replace(" ", "").split(",")]
    if len(set(seeds)) != len(seeds):
        raise ToolkitError(f"--seeds lists a seed twice: {shown(text)}")
    if len(seeds) < 2 or len(seeds) > MAX_SEEDS or max(seeds) > MAX_SEED:
        raise ToolkitError(f"--seeds needs 2 to {MAX_SEEDS} different seeds from 0 to {MAX_SEED:,}, not {shown(text)}")
    return seeds


def train_seeds(recipe: Recipe, seeds: list[int], *, console: Console | None = None, overrides: list[str] | None = None,
                **options) -> tuple[list[RunResult], Path]:
    """Train ``recipe`` once per seed: one run directory each (``<recipe>-seed<N>-<time>``) and a
    summary of best and final test accuracy (mean and spread) in ``out/<recipe>-seeds-<time>.md``
    and ``.json``. On a GPU the seeds train together, epoch by epoch, each on its own CUDA stream
    (their small steps' kernels run side by side); elsewhere one after the other, each exactly the
    run ``toolkit train --seed N`` gives."""
    console = console or Console(stderr=True)
    if options.pop("resume", None) is not None or options.pop("seed", None) is not None:
        raise ToolkitError("--seeds trains new runs: not with --seed or --resume")
    together = pick_device(options.get("device", "auto")).type == "cuda"
    console.print(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): "
                  + ("trained together on the GPU, one CUDA stream each, epoch by epoch" if together else "trained one after the other"))
    runs = {seed: train_epochs(recipe, console=Console(file=_Prefixed(console.file, f"seed {seed} | "), force_terminal=False, width=console.width),
                               overrides=overrides, seed=seed, run_name=f"{recipe.name}-seed{seed}", **options) for seed in seeds}
    results: dict[int, RunResult] = {}
    if together:
        # one thread: each run queues an epoch on its own stream and yields before waiting for it,
        # so the seeds' small kernels run side by side on the GPU
        import torch

        streams = {seed: torch.cuda.Stream() for seed in seeds}
        while len(results) < len(seeds):
            for seed in seeds:
                if seed not in results:
                    with torch.cuda.stream(streams[seed]):
                        results.update(_advance(seed, runs[seed]))
    else:
        for seed in seeds:
            while seed not in results:
                results.update(_advance(seed, runs[seed]))
    ordered = [results[seed] for seed in seeds]
    summary = write_seed_summary(recipe, seeds, ordered, Path(options.get("out", "runs")), together)
    follows = not differences(recipe, {**options, "overrides": overrides})  # else the write-up's figure is not this run's bar
    console.print(seeds_table(recipe, seeds, ordered, compare=follows))
    console.print(f"summary: {summary}")
    return ordered, summary


def _advance(seed: int, run) -> dict:
    """One step of a seed's run generator: {seed: RunResult} when it has ended, else {}."""
    try:
        next(run)
    except StopIteration as stop:
        return {seed: stop.value}
    except ToolkitError as exc:
        raise ToolkitError(f"seed {seed}: {exc}") from None
    return {}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def seed_summary(seeds: list[int], results: list[RunResult]) -> dict:
    return {
        "runs": [{"seed": seed, "run_dir": str(r.run_dir), "best_test_acc": r.best_test_acc, "final_test_acc": r.final_test_acc,
                  "epochs": r.epochs, "seconds": round(r.seconds, 2)} for seed, r in zip(seeds, results)],
        "best_test_acc": _spread([r.best_test_acc for r in results]),
        "final_test_acc": _spread([r.final_test_acc for r in results]),
    }


def seeds_table(recipe: Recipe, seeds: list[int], results: list[RunResult], compare: bool = True) -> Table:
    info = seed_summary(seeds, results)
    table = Table(title=f"{recipe.name}: {len(seeds)} seeds")
    for col in ("seed", "best test acc", "final test acc", "epochs", "seconds", "run"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in info["runs"]:
        table.add_row(str(row["seed"]), f"{row['best_test_acc']:.2f}%", f"{row['final_test_acc']:.2f}%", str(row["epochs"]),
                      f"{row['seconds']:.1f}", Path(row["run_dir"]).name)
    b, f = info["best_test_acc"], info["final_test_acc"]
    table.add_row("mean ± sd", f"{b['mean']:.2f} ± {b['sd']:.2f}%", f"{f['mean']:.2f} ± {f['sd']:.2f}%", "", "", "")
    sr = recipe.seed_results
    if compare and sr is not None and sr.test_acc is not None:
        table.caption = f"the write-up: {sr.test_acc:.2f}% final; this mean is {f['mean'] - sr.test_acc:+.2f} pp from it"
    return table


def write_seed_summary(recipe: Recipe, seeds: list[int], results: list[RunResult], out: Path, together: bool) -> Path:
    info = {"recipe": recipe.name, "seeds": seeds, "trained": "together on the GPU" if together else "one after the other",
            **seed_summary(seeds, results)}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = make_dir(out, "runs folder") / f"{recipe.name}-seeds-{stamp}.md"
    b, f = info["best_test_acc"], info["final_test_acc"]
    lines = [f"# {recipe.name}: {len(seeds)} seeds ({info['trained']})", "",
             "| seed | best test acc | final test acc | epochs | seconds | run |", "|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['seed']} | {r['best_test_acc']:.2f}% | {r['final_test_acc']:.2f}% | {r['epochs']} | {r['seconds']:.1f} | "
              f"{Path(r['run_dir']).name} |" for r in info["runs"]]
    lines += [f"| mean ± sd | {b['mean']:.2f} ± {b['sd']:.2f}% | {f['mean']:.2f} ± {f['sd']:.2f}% | | | |", ""]
    with atomic_write(path.with_suffix(".json"), "w") as fh:
        fh.write(json.dumps(info, indent=1) + "\n")
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
