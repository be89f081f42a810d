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

Prints images/s for each, the ratio toolkit / seeds (lower is better) and each side's test
accuracy after the last epoch (the toolkit's best epoch too), so a speed-up that costs accuracy
shows. MNIST runs on the real
files under --data-dir. CIFAR recipes (ft1-6, resnet20_*, resnet44v2_cifar100) run on generated
CIFAR files in the real on-disk format (bench/cifar_files.py; ``--generated-cifar N`` training
images, N/5 test images): there is no CIFAR data here, so those figures are speed only.

    python bench/train_speed.py --recipe ft6 --epochs 1 --generated-cifar 5000
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.cifar_files, when run as a script


def register_generated_cifar(md5_file: str | None) -> None:
    """In a child process: accept the generated CIFAR files in torchvision's integrity check."""
    if md5_file:
        from bench.cifar_files import register

        register(json.loads(Path(md5_file).read_text()))


def seed_pipeline(recipe_ref: str, epochs: int, data_dir: str, device: str, workers: int) -> None:
    """The seeds' training loop, as their scripts ran it."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from toolkit.data import sources
    from toolkit.core.datasets import facts
    from toolkit.models.blocks import with_torch_dropout
    from toolkit.models.recipes import load_recipe
    from toolkit.train.optim import build_scheduler

    recipe = load_recipe(recipe_ref)
    torch.manual_seed(recipe.seed)
    dev = torch.device(device)
    root = Path(data_dir)
    dataloader_recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"pipeline": "dataloader"})})
    train_ds = sources.build_dataset(dataloader_recipe, root, train=True, download=False)
    test_ds = sources.build_dataset(dataloader_recipe, root, train=False, download=False)
    kwargs = {"num_workers": workers, "pin_memory": dev.type == "cuda"}
    train_loader = DataLoader(train_ds, batch_size=recipe.data.batch_size, shuffle=True, **kwargs)
    test_loader = DataLoader(test_ds, batch_size=recipe.data.test_batch_size, shuffle=False, **kwargs)
    model = recipe.build_model(facts(recipe.data.dataset).num_classes)
    with_torch_dropout(model)  # the write-ups' torch dropout (the toolkit's draws its CPU masks faster)
    model = model.to(dev)
    o = recipe.optimizer  # torch's default SGD, as the seeds' scripts built it (the toolkit's is fused)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
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


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of the whole process, and its standard output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def seeds_final_accuracy(stdout: str) -> float:
    """The seeds' side prints 'seed pipeline epoch N: test acc X%' after each epoch."""
    found = re.findall(r"test acc ([0-9.]+)%", stdout)
    if not found:
        sys.exit(f"the seeds' pipeline printed no test accuracy:\n{stdout[-2000:]}")
    return float(found[-1])


def toolkit_accuracy(runs: Path) -> tuple[float, float, list[float]]:
    """(best, final) test accuracy and the seconds of the epochs (training and each epoch's test
    pass, without start-up and data loading) from the one run's metrics.csv."""
    (metrics,) = runs.glob("*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    accs = [float(row["test_acc"]) for row in rows]
    return max(accs), accs[-1], [float(row["seconds"]) for row in rows]


def machine_name(device: str) -> str:
    from toolkit.core.environment import cpu_line as machine

    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))}; host {machine()}"
    return machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fine4")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed-workers", type=int, default=0, help="DataLoader workers for the seeds' pipeline")
    parser.add_argument("--pipeline", default="fast", choices=("fast", "dataloader"), help="the toolkit's data pipeline")
    parser.add_argument("--compile", default="none", help="the toolkit side's torch.compile mode (toolkit train --compile)")
    parser.add_argument("--engine", default="auto", help="the toolkit side's step engine (toolkit train --engine)")
    parser.add_argument("--toolkit-only", action="store_true", help="time the toolkit side only (no seeds' pipeline, no ratio)")
    parser.add_argument("--json", dest="json_out", help="also write the result here")
    parser.add_argument("--generated-cifar", type=int, default=5000, help="CIFAR recipes: training images generated (test: a fifth)")
    parser.add_argument("--run-seed-pipeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-toolkit", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--cifar-md5", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_seed_pipeline:
        register_generated_cifar(args.cifar_md5)
        seed_pipeline(args.recipe, args.epochs, args.data_dir, args.device, args.seed_workers)
        return
    if args.run_toolkit is not None:  # `toolkit ...` exactly as the command line runs it
        register_generated_cifar(args.cifar_md5)
        from toolkit.cli import main as toolkit_main

        sys.argv = ["toolkit", *args.run_toolkit]
        toolkit_main()
        return

    from toolkit.core.datasets import facts
    from toolkit.models.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        seed_cmd = [sys.executable, __file__, "--run-seed-pipeline"]
        toolkit_cmd = [sys.executable, "-m", "toolkit"]
        data_dir = args.data_dir
        if recipe.data.dataset == "mnist":
            n_train = 60_000 * args.epochs
        else:
            from bench.cifar_files import write_cifar

            n = args.generated_cifar
            data_dir = str(Path(tmp) / "data")
            md5 = Path(tmp) / "md5.json"
            md5.write_text(json.dumps(write_cifar(Path(data_dir), per_batch=n // 5, test=n // 5, c100_train=n, c100_test=n // 5)))
            seed_cmd += ["--cifar-md5", str(md5)]
            toolkit_cmd = [sys.executable, __file__, "--cifar-md5", str(md5), "--run-toolkit"]
            n_train = (n // 5) * 5 * args.epochs
        seeds, seeds_out = None, ""
        if not args.toolkit_only:
            seeds, seeds_out = timed([*seed_cmd, "--recipe", args.recipe, "--epochs", str(args.epochs),
                                      "--data-dir", data_dir, "--device", args.device, "--seed-workers", str(args.seed_workers)])
        toolkit, toolkit_out = timed([*toolkit_cmd, "train", args.recipe, "--epochs", str(args.epochs), "--device", args.device,
                                      "--data-dir", data_dir, "--out", str(Path(tmp) / "runs"), "--pipeline", args.pipeline, "--compile", args.compile,
                                      "--engine", args.engine])
        toolkit_best, toolkit_final, each_epoch = toolkit_accuracy(Path(tmp) / "runs")
        epoch_seconds = sum(each_epoch)
    result = {
        "recipe": args.recipe, "epochs": args.epochs, "images": "real" if recipe.data.dataset == "mnist" else f"generated, {n_train // args.epochs} per epoch",
        "device": args.device, "pipeline": args.pipeline, "compile": args.compile, "dataset": facts(recipe.data.dataset).name,
        # unrounded: a reader (or a test) recomputes one from the other exactly; the line below rounds for people
        "engine": args.engine, "train_images": n_train, "toolkit_seconds": toolkit, "toolkit_epoch_seconds": epoch_seconds,
        "toolkit_seconds_each_epoch": each_epoch,
        "toolkit_images_per_s": n_train / toolkit, "toolkit_best_test_acc": toolkit_best, "toolkit_final_test_acc": toolkit_final,
        "machine": machine_name(args.device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if seeds is not None:
        result.update(seeds_seconds=seeds, seeds_images_per_s=n_train / seeds, ratio_toolkit_over_seeds=toolkit / seeds,
                      speedup_over_seeds=seeds / toolkit, seeds_final_test_acc=seeds_final_accuracy(seeds_out))
    line = f"{args.recipe}, {args.epochs} epoch(s) on {args.device}, toolkit pipeline {args.pipeline}, engine {args.engine}: "
    if seeds is not None:
        line += f"seeds {seeds:.1f}s ({result['seeds_images_per_s']:,.0f} img/s), "
    line += (f"toolkit {toolkit:.1f}s whole process, {epoch_seconds:.2f}s in its epochs ({', '.join(f'{e:.2f}' for e in each_epoch)}; "
             f"{result['toolkit_images_per_s']:,.0f} img/s)")
    if seeds is not None:
        line += (f", {result['speedup_over_seeds']:.2f}x the seeds (ratio {result['ratio_toolkit_over_seeds']:.2f}); "
                 f"final test accuracy seeds {result['seeds_final_test_acc']:.2f}%")
    print(line + f"; toolkit final {toolkit_final:.2f}% (best {toolkit_best:.2f}%)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
