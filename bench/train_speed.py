"""Training speed: the seeds' own pipeline vs. `toolkit train`, same recipe and epochs, back to back.

    python bench/train_speed.py --recipe fine4 --epochs 1 --data-dir ../shared/data [--device cpu|cuda]

Each side runs as its own process and is timed whole (start-up, data loading, training and
the full test pass), as a user would wait for it:

- seeds: the write-ups' pipeline, re-created here: torchvision dataset with per-sample
  transforms (the recipe's augmentations + ToTensor + Normalize), a DataLoader, the same model
  and SGD settings, and a per-step ``loss.item()`` for the progress line as their training logs
  show; test pass at the end of each epoch.
- toolkit: ``toolkit train RECIPE --epochs N --pipeline P`` (``--pipeline``: fast by default, or
  dataloader, the seeds' pipeline inside the toolkit's loop).

Prints images/s for each and the ratio toolkit / seeds (lower is better). MNIST only for now:
the CIFAR recipes need CIFAR files, which torchvision's integrity check only accepts when real.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def seed_pipeline(recipe_ref: str, epochs: int, data_dir: str, device: str, workers: int) -> None:
    """The seeds' training loop, as their scripts ran it."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from toolkit import data as data_mod
    from toolkit.recipes import load_recipe
    from toolkit.train import build_optimizer, build_scheduler

    recipe = load_recipe(recipe_ref)
    torch.manual_seed(recipe.seed)
    dev = torch.device(device)
    root = Path(data_dir)
    dataloader_recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"pipeline": "dataloader"})})
    train_ds = data_mod.build_dataset(dataloader_recipe, root, train=True, download=False)
    test_ds = data_mod.build_dataset(dataloader_recipe, root, train=False, download=False)
    kwargs = {"num_workers": workers, "pin_memory": dev.type == "cuda"}
    train_loader = DataLoader(train_ds, batch_size=recipe.data.batch_size, shuffle=True, **kwargs)
    test_loader = DataLoader(test_ds, batch_size=recipe.data.test_batch_size, shuffle=False, **kwargs)
    model = recipe.build_model(data_mod.SPECS[recipe.data.dataset].num_classes).to(dev)
    optimizer = build_optimizer(recipe, model)
    scheduler, when = build_scheduler(recipe, optimizer)
    for epoch in range(epochs):
        model.train()
        correct = processed = 0
        for x, y in train_loader:
            x, y = x.to(dev), y.to(dev)
            optimizer.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            correct += (out.argmax(1) == y).sum().item()
            processed += len(y)
            _progress = f"loss={loss.item():.4f} acc={100 * correct / processed:.2f}"  # the seeds' tqdm line
        model.eval()
        test_correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(dev), y.to(dev)
                test_correct += (model(x).argmax(1) == y).sum().item()
        if when == "epoch":
            scheduler.step()
        print(f"seed pipeline epoch {epoch + 1}: test acc {100 * test_correct / len(test_ds):.2f}%", flush=True)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fine4")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed-workers", type=int, default=0, help="DataLoader workers for the seeds' pipeline")
    parser.add_argument("--pipeline", default="fast", choices=("fast", "dataloader"), help="the toolkit's data pipeline")
    parser.add_argument("--json", dest="json_out", help="also write the result here")
    parser.add_argument("--run-seed-pipeline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_seed_pipeline:
        seed_pipeline(args.recipe, args.epochs, args.data_dir, args.device, args.seed_workers)
        return

    from toolkit.data import SPECS
    from toolkit.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    n_train = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}[recipe.data.dataset] * args.epochs
    seeds = timed([sys.executable, __file__, "--run-seed-pipeline", "--recipe", args.recipe, "--epochs", str(args.epochs),
                   "--data-dir", args.data_dir, "--device", args.device, "--seed-workers", str(args.seed_workers)])
    with tempfile.TemporaryDirectory() as out:
        toolkit = timed([sys.executable, "-m", "toolkit", "train", args.recipe, "--epochs", str(args.epochs), "--device", args.device,
                         "--data-dir", args.data_dir, "--out", out, "--pipeline", args.pipeline])
    result = {
        "recipe": args.recipe, "epochs": args.epochs, "device": args.device, "pipeline": args.pipeline, "dataset": SPECS[recipe.data.dataset].name,
        "seeds_seconds": round(seeds, 2), "toolkit_seconds": round(toolkit, 2),
        "seeds_images_per_s": round(n_train / seeds, 1), "toolkit_images_per_s": round(n_train / toolkit, 1),
        "ratio_toolkit_over_seeds": round(toolkit / seeds, 3),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"{args.recipe}, {args.epochs} epoch(s) on {args.device}, toolkit pipeline {args.pipeline}: seeds {seeds:.1f}s ({result['seeds_images_per_s']:,.0f} img/s), "
          f"toolkit {toolkit:.1f}s ({result['toolkit_images_per_s']:,.0f} img/s), ratio {result['ratio_toolkit_over_seeds']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
