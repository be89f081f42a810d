"""`toolkit eval`: test accuracy, per-class accuracy and a confusion-matrix PNG for a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from toolkit.data.sources import source_for
from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.models.recipes import Recipe
from toolkit.train.report import pyplot, save_png
from toolkit.data.build import make_loader_for_eval
from toolkit.train.loop import evaluate, pick_device, progress_bar


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    n = len(classes)
    size = max(5.0, min(20.0, 0.45 * n))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm.numpy(), cmap="Blues")
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)


def evaluate_checkpoint(ref, *, data_dir=None, device: str = "auto", console: Console | None = None, download: bool = True) -> dict:
    console = console or Console(stderr=True)
    ckpt = load_checkpoint(ref)
    recipe = Recipe.model_validate(ckpt["recipe"])
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    test_ds = source_for(recipe, data_dir, recorded_data_dir=ckpt["meta"].get("data_dir"), download=download).dataset(train=False)
    loader = make_loader_for_eval(test_ds, recipe.data.test_batch_size, dev)
    with progress_bar(console) as progress:
        loss, acc, preds, labels = evaluate(model, loader, dev, progress=progress)
    classes = ckpt["meta"]["classes"]
    cm = confusion_matrix(preds, labels, len(classes))
    per_class = {name: round(100.0 * cm[i, i].item() / max(1, cm[i].sum().item()), 4) for i, name in enumerate(classes)}
    png = Path(ckpt["path"]).with_name(f"confusion-{Path(ckpt['path']).stem}.png")
    plot_confusion(cm, classes, png, f"{recipe.name}: {acc:.2f}% on {len(labels):,} test images")

    table = Table(title=f"{recipe.name} ({Path(ckpt['path'])}): test accuracy {acc:.2f}%")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("images", justify="right")
    for i, name in enumerate(classes):
        table.add_row(name, f"{per_class[name]:.2f}%", str(cm[i].sum().item()))
    console.print(table)
    console.print(f"confusion matrix: {png}")
    return {
        "checkpoint": ckpt["path"],
        "recipe": recipe.name,
        "dataset": recipe.data.dataset,
        "images": len(labels),
        "test_acc": round(acc, 4),
        "test_loss": round(loss, 6),
        "per_class_acc": per_class,
        "confusion_png": str(png),
    }
