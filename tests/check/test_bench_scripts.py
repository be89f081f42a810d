"""bench/train_speed.py runs end to end on CPU for the CIFAR recipes, on generated CIFAR files
(the GPU figures of the speed issue come from the same script on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize("recipe", ["ft6", "resnet20_baseline"])
def test_train_speed_runs_both_sides_on_generated_cifar(recipe, tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_speed.py"), "--recipe", recipe, "--epochs", "1",
                           "--generated-cifar", "100", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["recipe"] == recipe and result["dataset"] == "cifar10" and result["images"] == "generated, 100 per epoch"
    assert result["seeds_seconds"] > 0 and result["toolkit_seconds"] > 0
    # the JSON holds unrounded values, so these hold exactly however slow (or busy) the machine is
    s, t = result["seeds_seconds"], result["toolkit_seconds"]
    assert result["train_images"] == 100 and result["ratio_toolkit_over_seeds"] == t / s
    assert result["toolkit_images_per_s"] == 100 / t and result["seeds_images_per_s"] == 100 / s
    # accuracies are read from each side's own output: percentages of a 20-image test set
    for key in ("seeds_final_test_acc", "toolkit_best_test_acc", "toolkit_final_test_acc"):
        assert 0.0 <= result[key] <= 100.0 and (result[key] * 20 / 100) == pytest.approx(round(result[key] * 20 / 100)), (key, result[key])
    assert result["toolkit_best_test_acc"] >= result["toolkit_final_test_acc"]
    assert result["compile"] == "none" and "cores" in result["machine"]


def test_the_training_walk_from_the_recipe_is_at_most_25_moves(mnist_root):
    """#41: bench/training_walk.py follows `toolkit train` from the recipe to the first backward pass; the moves
    between the stages' folders (train, data, models) stay within 25. The count can fail: it is measured, not set."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "training_walk.py"), str(REPO / "recipes" / "fine4.toml"),
                           "--data-dir", str(mnist_root)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("between the stages' folders"))
    moves = int(line.split(": ")[1].split()[0])
    assert 10 <= moves <= 25, line  # at least the recipe, the data, the model and the step: a walk was traced
