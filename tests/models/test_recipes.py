"""Every recipe parses; every kind of bad recipe is a one-line error naming the file and the key."""

import re
import subprocess
import sys

import pytest

from tests.helpers import RECIPES, write_recipe_variant
from toolkit.core.errors import ToolkitError
from toolkit.models.registry import count_params
from toolkit.core.datasets import facts
from toolkit.models.recipes import load_recipe
from toolkit.train.report import recipe_rows

ALL = sorted(RECIPES.glob("*.toml"))
DOCUMENTED = ["opt1", "opt2", "fine1", "fine2", "fine3", "fine4", "ft1", "ft2", "ft3", "ft4", "ft5", "ft6",
              "resnet20_baseline", "resnet20_dense_es", "resnet20_dense", "resnet20_dropout", "resnet20_smooth_lr",
              "resnet44v2_cifar100"]
BEYOND_THE_SEEDS = ["fashion_gap", "fashion_resnet20"]  # no write-up ran them: no seed figures


def test_one_recipe_per_documented_experiment():
    assert sorted(p.stem for p in ALL) == sorted(DOCUMENTED + BEYOND_THE_SEEDS)
    assert all(load_recipe(RECIPES / f"{name}.toml").seed_results is None for name in BEYOND_THE_SEEDS)


def test_the_zoo_adapts_to_grey_images():
    """ResNet20 (seed 003, written for 3-channel CIFAR) takes one 28x28 channel with in_channels = 1."""
    import torch

    recipe = load_recipe(RECIPES / "fashion_resnet20.toml")
    model = recipe.build_model(10).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(model) == 270_410 - 2 * 16 * 9  # the stem's conv sees 1 channel instead of 3
    with pytest.raises(ToolkitError, match="does not take fashion_mnist images"):
        load_recipe(RECIPES / "resnet20_baseline.toml", ["data.dataset=fashion_mnist"])


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_recipe_parses_and_matches_seed_params(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    model = recipe.build_model(facts(recipe.data.dataset).num_classes)
    sr = recipe.seed_results
    if sr and sr.params:
        # exact, or within 1% for the FT family (see toolkit/models/registry.py)
        assert abs(count_params(model) - sr.params) / sr.params <= 0.01


def test_fast_pipeline_is_the_default_and_a_recipe_can_choose_the_dataloader(tmp_path):
    """Every bundled recipe trains on the fast path unless it says otherwise (all three datasets fit in memory)."""
    assert {load_recipe(p).data.pipeline for p in ALL} == {"fast"}
    text = (RECIPES / "fine4.toml").read_text()
    assert "batch_size = 64\n" in text
    custom = tmp_path / "fine4.toml"
    custom.write_text(text.replace("batch_size = 64\n", 'batch_size = 64\npipeline = "dataloader"\n', 1))
    assert load_recipe(custom).data.pipeline == "dataloader"


def test_fine4_is_the_documented_configuration():
    r = load_recipe(RECIPES / "fine4.toml")
    assert (r.epochs, r.data.batch_size, r.optimizer.lr, r.optimizer.momentum) == (20, 64, 0.04, 0.9)
    assert (r.scheduler.name, r.scheduler.step_size, r.scheduler.gamma) == ("step", 10, 0.1)
    assert r.data.augment.rotation == 7.0
    assert (r.seed_results.test_acc, r.seed_results.best_test_acc) == (99.53, 99.54)


def test_recipe_listing_has_the_documented_fields():
    rows = recipe_rows(RECIPES)
    fine4 = next(r for r in rows if r["name"] == "fine4")
    assert fine4 == {**fine4, "dataset": "mnist", "model": "mnist_gap", "params": 7974, "epochs": 20, "seed_test_acc": 99.54}
    assert {"name", "path", "dataset", "model", "params", "epochs", "seed_test_acc"} <= set(fine4)
    # a write-up that reports only a final figure is not shown as a "best" one
    baseline = next(r for r in rows if r["name"] == "resnet20_baseline")
    assert (baseline["seed_best_test_acc"], baseline["seed_final_test_acc"]) == (None, 89.63)
    from rich.console import Console

    from toolkit.train.report import recipes_table

    console = Console(record=True, width=200)
    console.print(recipes_table(rows))
    text = console.export_text()
    assert "— / 89.63%" in text and "99.54% / 99.53%" in text and "best / final" in text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(epochz=3), "epochz: unknown key"),
        (lambda d: d["optimizer"].update(lrr=0.1), "optimizer.lrr: unknown key"),
        (lambda d: d["optimizer"].update(lr=-0.1), "optimizer.lr: Input should be greater than 0"),
        (lambda d: d["model"].update(name="mnist_huge"), "model.name: unknown model 'mnist_huge'"),
        (lambda d: d.update(epochs="twenty"), "epochs: Input should be a valid integer"),
        (lambda d: d["scheduler"].update(step_size=0), "scheduler.step_size: Input should be greater than or equal to 1"),
        (lambda d: d["data"].update(dataset="imagenet"), "data.dataset: Input should be 'mnist', 'fashion_mnist', 'cifar10', 'cifar100' or 'folder'"),
        (lambda d: d["model"].update(options={"dropuot": 0.1}), "model.options: model 'mnist_gap' has no option 'dropuot'"),
    ],
    ids=["unknown-key", "unknown-nested-key", "negative-lr", "unknown-model", "wrong-type", "out-of-range", "bad-dataset", "bad-model-option"],
)
def test_bad_recipe_names_file_and_key(tmp_path, edit, message):
    path = write_recipe_variant(tmp_path, edit)
    with pytest.raises(ToolkitError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_missing_and_non_toml_files(tmp_path):
    with pytest.raises(ToolkitError, match="recipe not found: .*nope.toml"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n[model\n")
    with pytest.raises(ToolkitError, match=r"bad.toml: not valid TOML"):
        load_recipe(bad)


def test_recipe_by_name():
    assert load_recipe("fine4").name == "fine4"


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    path = write_recipe_variant(tmp_path, lambda d: d["optimizer"].update(lr=-1))
    proc = subprocess.run([sys.executable, "-m", "toolkit", "train", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "optimizer.lr" in lines[0]
    assert "Traceback" not in proc.stderr


def test_set_overrides_any_recipe_key_and_is_checked_like_the_file(tmp_path):
    from toolkit.models.recipes import load_recipe

    recipe = load_recipe("fine4", ["optimizer.lr=0.02", "data.batch_size=256", "data.augment.hflip=0.5", "model.options.dropout=0.1",
                                   "scheduler.name=cosine", "scheduler.t_max=20", "description=my run"])
    assert recipe.name == "fine4" and recipe.optimizer.lr == 0.02 and recipe.data.batch_size == 256
    assert recipe.data.augment.hflip == 0.5 and recipe.data.augment.rotation == 7.0  # the rest of the table stays
    assert recipe.model.options["dropout"] == 0.1 and recipe.scheduler.name == "cosine" and recipe.description == "my run"
    for overrides, expected in (
        (["optimizer.lr=-1"], "--set 'optimizer.lr=-1': optimizer.lr: Input should be greater than 0"),  # the --set is to blame (#31)
        (["optimizer.lrr=1"], "--set 'optimizer.lrr=1': optimizer.lrr: unknown key"),
        (["data.batch_size=big"], "--set 'data.batch_size=big': data.batch_size: "),
        (["lr"], "--set 'lr': give KEY=VALUE"),
        (["optimizer.lr.x=1"], "optimizer.lr is a value"),
        (["model.options.widths=3"], "--set 'model.options.widths=3': model.options: "),
        (['description="x"\n[evil]\na=1'], "the value is more than one TOML value"),
        (['description="x"\nseed=5'], "the value is more than one TOML value"),
    ):
        with pytest.raises(ToolkitError, match=re.escape(expected)):
            load_recipe("fine4", overrides)
    # a bad value in the file itself is the file's, whatever else --set changed
    bad = write_recipe_variant(tmp_path, lambda d: d["optimizer"].update(lr=-1))
    with pytest.raises(ToolkitError, match=re.escape("bad.toml: optimizer.lr: Input should be greater than 0")):
        load_recipe(bad, ["data.batch_size=64"])


def test_a_runs_recipe_toml_trains_the_same_run_again(mnist_root, tmp_path):
    """`toolkit train fine4 --set ...` writes the resolved recipe into the run; training that file
    again (with the limits its header names) gives the same weights bit for bit and the same metrics.
    The run departs from the recipe, so its summary and recipe.toml do not claim the seed's figures."""
    import tomllib

    import torch

    from tests.helpers import run_cli

    limits = ["--epochs", "1", "--train-limit", "1000", "--test-limit", "500", "--data-dir", str(mnist_root)]
    first = run_cli("train", "fine4", "--set", "optimizer.lr=0.02", "--set", "data.batch_size=32", *limits, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    said = first.stdout + first.stderr
    assert "not compared with the write-up" in said and "--set optimizer.lr=0.02" in said
    (run_a,) = (tmp_path / "a").iterdir()
    text = (run_a / "recipe.toml").read_text()
    assert "# it also ran with: --train-limit 1000 --test-limit 500" in text
    data = tomllib.loads(text)
    assert data["optimizer"]["lr"] == 0.02 and data["data"]["batch_size"] == 32 and data["epochs"] == 1 and "seed_results" not in data
    again = run_cli("train", run_a / "recipe.toml", "--train-limit", "1000", "--test-limit", "500", "--data-dir", str(mnist_root),
                    "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    (run_b,) = (tmp_path / "b").iterdir()
    assert run_b.name.startswith("fine4-") and (run_b / "recipe.toml").read_text() == text
    a, b = (torch.load(r / "best.pt", weights_only=True) for r in (run_a, run_b))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["metrics"]) == strip(b["metrics"]) and a["recipe"] == b["recipe"]


@pytest.mark.parametrize("overrides, message", [
    (["model.options.num_classes=3"], "model.options.num_classes = 3, but mnist has 10 classes"),
    (["scheduler.name=cosine", "scheduler=5"], "scheduler: Input should be a valid dictionary"),
    (["optimizer.lr=" + "[" * 50_000], "the value is nested too deeply"),
    (["seed=4294967296"], "seed: Input should be less than or equal to 4294967295"),
])
def test_overrides_that_used_to_end_in_an_internal_error_are_one_line_errors(overrides, message):
    with pytest.raises(ToolkitError, match=re.escape(message)):
        load_recipe(RECIPES / "fine4.toml", overrides)
    assert load_recipe(RECIPES / "fine4.toml", ["model.options.num_classes=10"]).model.options["num_classes"] == 10


def test_a_recipe_that_is_a_fifo_is_refused_without_reading_it(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the file kind is checked first."""
    import os

    fifo = tmp_path / "r.toml"
    os.mkfifo(fifo)
    with pytest.raises(ToolkitError, match="not a regular file"):
        load_recipe(fifo)


def test_the_seed_is_bounded_on_the_command_line_and_in_train(mnist_root, tmp_path):
    from toolkit.train.run import parse_seeds, train

    from tests.helpers import quiet

    with pytest.raises(ToolkitError, match="--seed must be between 0 and 4,294,967,295"):
        train(load_recipe(RECIPES / "fine4.toml"), device="cpu", data_dir=mnist_root, out=tmp_path, seed=2**64, console=quiet())
    assert not list(tmp_path.iterdir())  # refused before any run folder
    with pytest.raises(ToolkitError, match="--seeds needs 2 to 64 different seeds from 0 to 4,294,967,295"):
        parse_seeds("1,18446744073709551616")
