"""`toolkit predict`: real MNIST test digits as PNG files through the deployed path, the same answers
as the demo's /predict and as verify's pipeline path; bad files are error rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port, mnist_test_set, run_cli
from toolkit.inference.catalog import Catalog
from toolkit.serve.predict import collect_inputs, predict


@pytest.fixture(scope="module")
def digit_folder(mnist_root, tmp_path_factory):
    """All 10,000 real MNIST test digits as PNG files, in ten sub-folders, plus three bad files."""
    images, labels = mnist_test_set(mnist_root)
    root = tmp_path_factory.mktemp("digits")
    truth = {}
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"part{i % 10}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray(img).save(path)
        truth[str(path)] = str(label)
    (root / "part0" / "notes.png").write_text("not an image")
    good = (root / "part1" / "00001.png").read_bytes()
    (root / "part1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "part2" / "empty.png").write_bytes(b"")
    return root, truth


def test_predict_a_folder_through_the_cli(serving_export, digit_folder, tmp_path):
    root, truth = digit_folder
    csv_path = tmp_path / "rows.csv"
    proc = run_cli("predict", serving_export, root, "--json", "--top-k", "3", "--batch", "64", "--csv", csv_path, timeout=600)
    assert proc.returncode == 1, proc.stderr  # three files could not be read
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(truth) + 3
    errors = {r["file"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"notes.png", "truncated.png", "empty.png"} and all("\n" not in e for e in errors.values())
    assert "error: 3 of 10003 image(s) could not be classified" in proc.stderr
    right = sum(r["label"] == truth[r["file"]] for r in rows if not r["error"])
    assert all(len(r["top"]) == 3 for r in rows if not r["error"])
    # the export's verify ran the same 10,000 images as PNG files through the same code: the same accuracy
    report = json.loads((serving_export / "parity.json").read_text())
    fp32 = next(r for r in report["results"] if r["artifact"] == "model.fp32.onnx")
    assert 100.0 * right / len(truth) == pytest.approx(fp32["pipeline_accuracy"], abs=1e-9)
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {r["file"]: r["label"] for r in table} == {r["file"]: r["label"] or "" for r in rows}


def test_predict_gives_the_demos_answers(serving_export, digit_folder, mnist_root):
    """The demo's /predict API and `toolkit predict` on the same 40 files: the same labels and
    probabilities (the same preprocessing and runner, batch 1)."""
    from gradio_client import Client, handle_file

    from toolkit.serve.server import serve

    root, truth = digit_folder
    files = sorted(truth)[::250]
    rows = predict(serving_export, files, top_k=3)
    running, url = serve([serving_export], port=free_port(), examples=0, block=False, console=None)
    try:
        client = Client(url, verbose=False)
        for path, row in zip(files, rows):
            answer = client.predict(handle_file(path), api_name="/predict")
            assert answer["label"] == row["label"]
            assert {c["label"]: c["confidence"] for c in answer["confidences"]} == pytest.approx(row["top"], rel=1e-6)
    finally:
        running.close()


def test_predict_with_a_run_uses_its_checkpoint(fine4_run, mnist_root, tmp_path):
    """A run directory instead of an export: the checkpoint in PyTorch behind the same preprocessing."""
    import torch

    from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint

    images, _ = mnist_test_set(mnist_root)
    files = []
    for i in range(20):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).save(files[-1])
    rows = predict(fine4_run.run_dir, [str(tmp_path / "*.png")])
    assert [r["artifact"].split("/")[1] for r in rows] == ["best.pt"] * 20
    model = model_from_checkpoint(load_checkpoint(fine4_run.run_dir))
    x = (torch.from_numpy(images[:20]).float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    expected = {str(tmp_path / f"{i}.png"): str(int(k)) for i, k in enumerate(model(x).argmax(1))}
    assert {r["file"]: r["label"] for r in rows} == expected


def test_inputs_are_collected_from_files_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("skipped in folders")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    found = collect_inputs([str(tmp_path / "a"), str(tmp_path / "*.JPG"), str(tmp_path / "nope.png"), str(tmp_path / "*.gif"),
                            str(tmp_path / "empty"), str(tmp_path / "a" / "notes.txt")])
    assert found == [(str(tmp_path / "a" / "x.png"), None), (str(tmp_path / "b.JPG"), None),
                     (str(tmp_path / "nope.png"), "no such file"), (str(tmp_path / "*.gif"), "no file matches this pattern"),
                     (str(tmp_path / "empty"), "no image files in this folder"), (str(tmp_path / "a" / "notes.txt"), None)]


def test_predict_without_images_or_with_a_wrong_artifact_is_one_line(serving_export, tmp_path):
    from tests.helpers import one_line_error

    assert "no images given" in one_line_error(run_cli("predict", serving_export, "--exports", tmp_path))
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert "unknown artifact" in one_line_error(run_cli("predict", serving_export, png, "--artifact", "nope/model.onnx"))


def test_batching_does_not_change_the_answers(serving_export, digit_folder):
    root, truth = digit_folder
    files = sorted(truth)[:300]
    catalog = Catalog.from_dirs([serving_export])
    one = catalog.classify_many(files, batch=1)
    many = catalog.classify_many(files, batch=64)
    assert [p.best for p in one] == [p.best for p in many]
    assert max(abs(p.top[p.best] - q.top[q.best]) for p, q in zip(one, many)) < 1e-5


def test_int8_verified_on_another_kind_of_cpu_is_a_warning(fine4_export, digit_folder, mnist_root, tmp_path):
    """int8 kernels differ between CPUs (VNNI, AVX-512, AMX): an export whose int8 artifact was verified
    on a CPU with other integer-kernel features says so when predict or bench runs it here."""
    import shutil

    from rich.console import Console

    from toolkit.inference.catalog import int8_warning
    from toolkit.core.environment import cpu_info
    from toolkit.core.manifest import Manifest, Verified
    from toolkit.check.verify import verify

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    verify(export_dir, data_dir=mnist_root, limit=500, download=False, console=Console(quiet=True))
    manifest = Manifest.load(export_dir)
    here = cpu_info()
    assert manifest.parity.cpu_features == here["features"] and int8_warning(manifest) is None  # verified here: nothing to say
    other = sorted({"avx512_vnni", "amx_int8"} ^ set(here["features"]))
    manifest.parity = Verified(**{**manifest.parity.model_dump(), "machine": "Other CPU, 64 cores, " + " ".join(other), "cpu_features": other})
    manifest.save(export_dir)
    warning = int8_warning(Manifest.load(export_dir))
    assert warning.startswith("warning:") and "Other CPU" in warning and "run `toolkit verify` here" in warning
    console = Console(record=True, width=300)
    predict(export_dir, [str(digit_folder[0] / "part0")], artifact=f"{export_dir.name}/model.int8.onnx", console=console)
    assert warning in console.export_text()
    console = Console(record=True, width=300)
    predict(export_dir, [str(digit_folder[0] / "part0")], artifact=f"{export_dir.name}/model.fp32.onnx", console=console)
    assert "warning:" not in console.export_text()  # fp32 kernels do not depend on those features
