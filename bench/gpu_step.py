"""The training step on a GPU, taken apart: milliseconds per step of the step engine
(toolkit.train.engine) captured in CUDA graphs and uncaptured, with bf16 autocast and channels-last
on and off, for fine4 (MNIST, batch 64) and ResNet20 (CIFAR-shaped, batch 128).

Each variant builds the recipe's model, fused SGD and the fast loader on the device, trains
``--epochs`` epochs through ``StepEngine.train_epoch`` and times the last one, synchronized at its
ends (warm-up and capture fall in the first). fine4 trains on the first ``--train-limit`` real
MNIST images and is scored on all 10,000 test images; ResNet20 trains on random images (speed
only). What `toolkit train` does on a GPU is the row with capture, autocast and channels-last on.

    python bench/gpu_step.py --data-dir DATA [--json out.json]     # --device cpu only to try it
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.data.loaders import split_arrays  # noqa: E402
from toolkit.core.datasets import facts  # noqa: E402
from toolkit.train.engine import StepEngine, lr_per_step  # noqa: E402
from toolkit.data.fast import TensorLoader  # noqa: E402
from toolkit.train.optim import build_optimizer  # noqa: E402
from toolkit.models.recipes import load_recipe  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(name: str, variant: dict, data: dict, epochs: int, seed: int, dev: torch.device) -> dict:
    recipe = load_recipe(name)
    torch.manual_seed(seed)
    spec = facts(recipe.data.dataset)
    norm = {"mean": spec.mean, "std": spec.std}
    loader = TensorLoader(data["x"], data["y"], recipe.data.batch_size, normalization=norm, generator=torch.Generator().manual_seed(seed),
                          shuffle=True, augment=recipe.data.augment, device=dev)
    model = recipe.build_model(spec.num_classes).to(dev)
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(recipe, model)
    net = torch.compile(model) if variant.get("compile") else model
    engine = StepEngine(net, model, optimizer, loader, dev, autocast=variant["autocast"], channels_last=variant["channels_last"],
                        capture=variant["capture"] and dev.type == "cuda")
    seconds, first = 0.0, None
    for _ in range(epochs):
        _sync(dev)
        t0 = time.perf_counter()
        loss_sum, correct, seen = engine.train_epoch(lr_per_step(optimizer, None, "none", len(loader)))
        _sync(dev)
        seconds = time.perf_counter() - t0
        first = seconds if first is None else first
    row = {"model": name, **variant, "seed": seed, "ms_per_step": 1000 * seconds / len(loader), "steps_per_epoch": len(loader),
           "first_epoch_s": first, "last_epoch_s": seconds, "train_acc": 100 * correct.item() / seen, "fell_back": engine.fell_back}
    if "tx" in data:
        model.eval()
        test = TensorLoader(data["tx"], data["ty"], 1000, normalization=norm, generator=None, shuffle=False, device=dev)
        right = 0
        with torch.no_grad():
            for x, y in test:
                right += (model(x).argmax(1) == y).sum().item()
        row["test_acc"] = 100 * right / len(data["ty"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--train-limit", type=int, default=12_800)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    parser.add_argument("--compile", action="store_true", help="only the toolkit's settings, with the model torch.compile'd inside the captured step")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    dev = torch.device(args.device)
    x, y, _ = split_arrays("mnist", Path(args.data_dir), train=True, download=False)
    tx, ty, _ = split_arrays("mnist", Path(args.data_dir), train=False, download=False)
    datasets = {
        "fine4": {"x": x[: args.train_limit], "y": y[: args.train_limit], "tx": tx, "ty": ty},
        "resnet20_baseline": {"x": torch.randint(0, 256, (args.train_limit, 3, 32, 32), dtype=torch.uint8,
                                                 generator=torch.Generator().manual_seed(0)),
                              "y": torch.randint(0, 10, (args.train_limit,), generator=torch.Generator().manual_seed(1))},
    }
    rows = []
    for name, data in datasets.items():
        for capture, autocast, channels_last in itertools.product((True, False), (True, False), (True, False)):
            if not capture and (not autocast or not channels_last) and name != "fine4":
                continue  # uncaptured: the toolkit's own settings only, as the reference
            if args.compile and not (capture and autocast and channels_last):
                continue
            variant = {"capture": capture, "autocast": autocast, "channels_last": channels_last, **({"compile": True} if args.compile else {})}
            row = run(name, variant, data, args.epochs, args.seed, dev)
            rows.append(row)
            print(f"{name:18s} capture={capture!s:5s} autocast={autocast!s:5s} channels_last={channels_last!s:5s}"
                  f"{' compiled' if args.compile else ''}: {row['ms_per_step']:.3f} ms/step (first epoch {row['first_epoch_s']:.1f} s), "
                  f"train {row['train_acc']:.2f}%"
                  + (f", test {row['test_acc']:.2f}%" if "test_acc" in row else "") + (f" [fell back: {row['fell_back']}]" if row["fell_back"] else ""),
                  flush=True)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else args.device
    result = {"device": name, "torch": torch.__version__, "train_images": args.train_limit, "epochs": args.epochs, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
