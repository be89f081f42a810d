"""`toolkit prune`: make a trained model smaller, fine-tune it, and report what it cost.

- ``l1-unstructured``: global magnitude pruning of conv and linear weights (torch's pruning
  utilities), made permanent; the zeros are re-applied after every fine-tuning step so they
  stay zero. Parameters keep their shapes: this is sparsity, not a smaller file.
- ``channel``: structured pruning with torch-pruning, which removes whole channels and every
  layer that depends on them, so parameters, MACs and the exported ONNX really shrink.

The fine-tuned model is a new run directory that exports and verifies like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from toolkit.data.sources import source_for
from toolkit.models.checkpoint import SUMMARY, checkpoint_dict, latest_run, load_checkpoint, model_from_checkpoint, new_run_dir, save_checkpoint
from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import resolve_data_dir
from toolkit.models.registry import count_params
from toolkit.models.recipes import Recipe
from toolkit.train.logs import write_summary
from toolkit.data.build import make_loader_for_eval
from toolkit.train.loop import evaluate, fit, pick_device

METHODS = ("l1-unstructured", "channel")


def model_stats(model: nn.Module, input_shape) -> dict:
    import torch_pruning as tp

    model = model.cpu().eval()
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"params": count_params(model), "macs": int(macs), "sparsity": round(100.0 * zeros / total, 2)}


def _prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune_l1_unstructured(model: nn.Module, amount: float):
    """Zero the ``amount`` smallest-magnitude weights across all conv/linear layers; returns the re-masking hook."""
    import torch.nn.utils.prune as tprune

    layers = _prunable(model)
    tprune.global_unstructured([(m, "weight") for m in layers], pruning_method=tprune.L1Unstructured, amount=amount)
    for m in layers:
        tprune.remove(m, "weight")
    masks = [(m.weight, m.weight != 0) for m in layers]

    @torch.no_grad()
    def keep_zeros(_model: nn.Module) -> None:
        for weight, mask in masks:
            weight.mul_(mask)

    return keep_zeros


def prune_channels(model: nn.Module, amount: float, input_shape) -> None:
    """Remove ``amount`` of the channels of every prunable layer (L1 magnitude), keeping the classifier's outputs."""
    import torch_pruning as tp

    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.zeros(1, *input_shape),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=amount,
        ignored_layers=[_classifier(model)],
    )
    pruner.step()


def _cut(model: nn.Module, method: str, amount: float, shape, name: str):
    """Prune ``model`` in place; the hook that keeps unstructured sparsity through fine-tuning (or None)."""
    if method == "l1-unstructured":
        return prune_l1_unstructured(model, amount)
    try:
        prune_channels(model, amount, shape)
    except Exception as exc:  # torch-pruning's tracer meets an op it cannot follow
        raise ToolkitError(f"channel pruning of {name} failed: {(str(exc).splitlines() or ['?'])[0]}") from None
    return None


def prune(
    ref=None,
    *,
    method: str = "channel",
    amount: float = 0.3,
    finetune_epochs: int = 2,
    runs: str | Path = "runs",
    out: str | Path | None = None,
    data_dir=None,
    device: str = "auto",
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
    console: Console | None = None,
) -> dict:
    console = console or Console(stderr=True)
    check_choice("pruning method", method, METHODS)
    if not 0 < amount < 1:
        raise ToolkitError(f"--amount must be between 0 and 1 (exclusive), not {amount}")
    if finetune_epochs < 0:
        raise ToolkitError("--finetune-epochs must be 0 or more")
    ckpt = load_checkpoint(ref if ref is not None else latest_run(runs, say=console.print))
    recipe = Recipe.model_validate(ckpt["recipe"])
    shape = ckpt["meta"]["input_shape"]
    model = model_from_checkpoint(ckpt)
    dev = pick_device(device)

    data_dir = resolve_data_dir(data_dir, ckpt["meta"].get("data_dir"))  # fine-tuning reads the same root
    test_ds = source_for(recipe, data_dir, download=download).dataset(train=False)
    if test_limit:
        test_ds = torch.utils.data.Subset(test_ds, range(min(test_limit, len(test_ds))))
    loader = make_loader_for_eval(test_ds, recipe.data.test_batch_size, dev)

    def accuracy(m: nn.Module) -> float:
        return evaluate(m.to(dev), loader, dev)[1]

    before = {**model_stats(model, shape), "test_acc": round(accuracy(model), 4)}
    after_step = _cut(model, method, amount, shape, recipe.model.name)
    pruned = {**model_stats(model, shape), "test_acc": round(accuracy(model), 4)}

    name = f"{recipe.name}-{method.split('-')[0]}{round(amount * 100)}"
    info = {"pruned": {"from": ckpt["path"], "method": method, "amount": amount, "finetune_epochs": finetune_epochs}}
    runs_out = Path(out) if out else Path(ckpt["path"]).parent.parent
    if finetune_epochs:
        result = fit(recipe.model_copy(update={"epochs": finetune_epochs}), device=device, data_dir=data_dir, out=runs_out,
                       train_limit=train_limit, test_limit=test_limit, download=download, console=console, model=model,
                       run_name=name, after_step=after_step, extra_meta=info)
        run_dir = result.run_dir
        final = model_from_checkpoint(load_checkpoint(run_dir))
    else:
        run_dir = new_run_dir(runs_out, name)
        meta = {**ckpt["meta"], **info, "params": count_params(model), "epoch": 0, "test_acc": pruned["test_acc"]}
        save_checkpoint(checkpoint_dict(recipe.model_copy(update={"epochs": 1}), model, meta, []), run_dir / "best.pt")
        write_summary({"run_dir": str(run_dir), "checkpoint": str(run_dir / "best.pt"), "epochs": 0, "pruned": info["pruned"]}, run_dir / SUMMARY)
        final = model
    after = {**model_stats(final, shape), "test_acc": round(accuracy(final), 4)}
    report = {"method": method, "amount": amount, "finetune_epochs": finetune_epochs, "source": ckpt["path"], "run_dir": str(run_dir),
              "checkpoint": str(run_dir / "best.pt"), "before": before, "pruned": pruned, "after": after}
    console.print(prune_table(report))
    return report


def prune_table(report: dict) -> Table:
    table = Table(title=f"{report['method']} pruning, amount {report['amount']}, {report['finetune_epochs']} fine-tuning epoch(s)")
    for col in ("", "params", "MACs", "weight sparsity", "test acc"):
        table.add_column(col, justify="left" if not col else "right")
    for label, key in (("before", "before"), ("pruned", "pruned"), ("fine-tuned", "after")):
        s = report[key]
        table.add_row(label, f"{s['params']:,}", f"{s['macs']:,}", f"{s['sparsity']:.1f}%", f"{s['test_acc']:.2f}%")
    return table
