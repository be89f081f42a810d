"""fine4's training step on a GPU, taken apart: time per step and accuracy after a short run for
each combination of what the GPU path of ``toolkit train`` turns on.

- autocast: bf16 autocast on or off; channels_last: the model and batches in NHWC or not.

On an H200 (2026-11-28, docs/benchmarks.md) every variant took 3.4-5.7 ms per step, CPU-bound:
the step launches ~180 kernels and PyTorch spends ~5 ms of CPU per step dispatching them, while
the GPU computes for ~1.1 ms. (A variant of the loader that copied the augmentation parameters
once per epoch instead of once per batch, measured in the same run, made no difference.)

Each variant trains fine4 (the recipe's optimizer and augmentation, no scheduler: 2 epochs end
before its first step) on the first ``--train-limit`` training images and scores all 10,000 test
images in float32. The time per step is the mean over the last epoch, synchronized at its ends.

    python bench/gpu_step.py --data-dir DATA [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.data import split_arrays  # noqa: E402
from toolkit.datasets import facts  # noqa: E402
from toolkit.fastdata import TensorLoader  # noqa: E402
from toolkit.loop import build_optimizer  # noqa: E402
from toolkit.recipes import load_recipe  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(variant: dict, data: dict, recipe, epochs: int, seed: int, dev: torch.device) -> dict:
    torch.manual_seed(seed)
    spec = facts(recipe.data.dataset)
    norm = {"mean": spec.mean, "std": spec.std}
    loader = TensorLoader(data["x"], data["y"], recipe.data.batch_size, normalization=norm, generator=torch.Generator().manual_seed(seed),
                 shuffle=True, augment=recipe.data.augment, device=dev)
    test = TensorLoader(data["tx"], data["ty"], 1000, normalization=norm, generator=None, shuffle=False, device=dev)
    model = recipe.build_model(spec.num_classes).to(dev)
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model)
    steps = 0
    for epoch in range(epochs):
        model.train()
        _sync(dev)
        t0 = time.perf_counter()
        steps = 0
        for x, y in loader:
            if variant["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=variant["autocast"]):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        _sync(dev)
        last_epoch = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test:
            correct += (model(x).argmax(1) == y).sum().item()
    return {**variant, "seed": seed, "ms_per_step": 1000 * last_epoch / steps, "steps_per_epoch": steps,
            "test_acc": 100 * correct / len(data["ty"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--train-limit", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    recipe = load_recipe("fine4")
    x, y, _ = split_arrays("mnist", Path(args.data_dir), train=True, download=False)
    tx, ty, _ = split_arrays("mnist", Path(args.data_dir), train=False, download=False)
    data = {"x": x[: args.train_limit], "y": y[: args.train_limit], "tx": tx, "ty": ty}
    rows = []
    for autocast, channels_last in itertools.product((True, False), (True, False)):
        for seed in args.seeds:
            row = run({"autocast": autocast, "channels_last": channels_last}, data, recipe, args.epochs, seed, torch.device(args.device))
            rows.append(row)
            print(f"autocast={autocast!s:5s} channels_last={channels_last!s:5s} seed={seed}: "
                  f"{row['ms_per_step']:.3f} ms/step, test {row['test_acc']:.2f}%", flush=True)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    result = {"device": name, "torch": torch.__version__, "train_images": len(data["y"]),
              "epochs": args.epochs, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
