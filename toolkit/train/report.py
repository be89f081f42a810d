"""Tables shared by the CLI and the docs: recipes with the write-ups' numbers."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from toolkit.core.files import atomic_write
from toolkit.models.registry import count_params
from toolkit.models.recipes import class_count, list_recipes


def recipe_rows(directory: Path) -> list[dict]:
    rows = []
    for path, recipe in list_recipes(directory):
        num_classes = class_count(recipe)
        sr = recipe.seed_results
        rows.append(
            {
                "name": recipe.name,
                "path": str(path),
                "dataset": recipe.data.dataset,
                "model": recipe.model.name,
                "params": count_params(recipe.build_model(num_classes)),
                "seed_params": sr.params if sr else None,
                "epochs": recipe.epochs,
                # the figure a table shows: the best if the write-up reports one, else its final one
                "seed_test_acc": (sr.best_test_acc if sr.best_test_acc is not None else sr.test_acc) if sr else None,
                "seed_best_test_acc": sr.best_test_acc if sr else None,
                "seed_final_test_acc": sr.test_acc if sr else None,
            }
        )
    return rows


def recipes_table(rows: list[dict]) -> Table:
    table = Table(title="recipes")
    columns = (("name", "left"), ("dataset", "left"), ("model", "left"), ("params", "right"), ("write-up params", "right"), ("epochs", "right"),
               ("write-up test acc best / final", "right"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["name"], r["dataset"], r["model"], f"{r['params']:,}",
            f"{r['seed_params']:,}" if r["seed_params"] else "—", str(r["epochs"]),
            " / ".join("—" if v is None else f"{v:.2f}%" for v in (r["seed_best_test_acc"], r["seed_final_test_acc"])),
        )
    return table


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures render without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write a figure atomically as PNG and free it."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    pyplot().close(fig)
