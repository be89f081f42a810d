"""The deployed image preparation against the plain baseline, per kind of input
(bench/preparation_eval.py on a sample): no kind may fall below the baseline by more than 0.5 pp
with significance (below_baseline).

The models are the suite's own short trainings (fine4 3 epochs, fashion_gap 1 epoch), so the
accuracies are lower than the fully trained figures in docs/preparation.md; the comparison with
the baseline is what is gated, on the same images and the same model.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import preparation_eval as pe
from tests.helpers import manifest_for
from toolkit.inference.catalog import Catalog
from toolkit.inference.preprocess import model_pixels, png_bytes
from toolkit.inference.splits import read_test_split

PER_KIND = 500
SLACK_PP = 0.5
SIGNIFICANT = 0.05


def fp32(export_dir):
    catalog = Catalog.from_dirs([export_dir])
    entry = next(e for e in catalog.entries.values() if e.artifact.precision == "fp32")
    return catalog.runner(entry), entry.manifest


def below_baseline(rows: list[pe.Row]) -> list[str]:
    """Kinds where the deployed path is below the baseline by more than 0.5 pp, and not by the luck
    of a few images: the suite's short-trained models move the two paths' difference on the hardest
    kinds by about a point between trainings (on the fully trained fine4 every kind is within
    0.5 pp, docs/preparation.md), so the gate also asks the exact McNemar test whether the losses
    outweigh the gains (one-sided p < 0.05)."""
    return [f"{r.kind}: {r.deployed_pct:.2f}% < plain {r.baseline_pct:.2f}% ({r.gained} gained, {r.lost} lost, p {r.worse_p:.3g})"
            for r in rows if r.deployed_pct < r.baseline_pct - SLACK_PP and r.worse_p < SIGNIFICANT]


@pytest.fixture(scope="module")
def digit_table(serving_export, mnist_root):
    run, manifest = fp32(serving_export)
    return pe.digit_rows(run, manifest, mnist_root, PER_KIND)


def test_no_handwriting_kind_is_below_the_plain_recipe(digit_table):
    assert len(digit_table) == len(pe.digit_kinds()) + 1  # every kind, and the real handwriting that is not MNIST
    assert not below_baseline(digit_table), pe.table(digit_table)
    by_kind = {r.kind: r for r in digit_table}
    # the kinds are what they claim: paper that is not white defeats the plain recipe, and the
    # deployed path reads those digits as well as clean ones (a preparation that did nothing would fail here)
    for kind in ("grey paper, noise", "uneven light", "photographed"):
        assert by_kind[kind].baseline_pct < 60 and by_kind[kind].deployed_pct > by_kind["dark on white"].deployed_pct - 3, pe.table(digit_table)
    assert all(r.failed == 0 for r in digit_table), pe.table(digit_table)


def test_the_gate_catches_a_step_that_costs_some_kind(serving_export, mnist_root):
    """The check has teeth: a step that thins every stroke (a 3x3 minimum filter on the prepared
    digit: the damage the old erosion did to soft, wide strokes) is caught on the enlarged
    low-resolution scans, and the deployed path is not."""
    from toolkit.inference.preprocess import _rank

    run, manifest = fp32(serving_export)
    low, labels = pe.sklearn_digits()
    pick = pe.sample(len(low), PER_KIND, 0)
    files = [pe.render_scan(low[i]) for i in pick]
    thinned = pe.evaluate(run, manifest, files, labels[pick], lambda f: _rank(model_pixels(f, manifest), 3, np.minimum),
                          pe.plain_digit, "thinned scans")
    deployed = pe.evaluate(run, manifest, files, labels[pick], lambda f: model_pixels(f, manifest), pe.plain_digit, "scans")
    assert below_baseline([thinned]) and not below_baseline([deployed]), pe.table([thinned, deployed])


def test_mnist_files_pass_the_deployed_path_unchanged(mnist_root):
    """MNIST's own test images as PNG files are the model's input exactly (verify's pipeline column)."""
    images, _, _ = read_test_split("mnist", mnist_root)
    manifest = manifest_for("mnist")
    for i in range(0, 10_000, 97):
        assert np.array_equal(model_pixels(png_bytes(images[i]), manifest), images[i, 0])


def test_no_garment_or_picture_kind_is_below_the_plain_resize(fashion_export, mnist_root):
    run, manifest = fp32(fashion_export)
    rows = pe.garment_rows(run, manifest, mnist_root, PER_KIND) + pe.picture_rows(run, manifest, mnist_root, PER_KIND)
    assert len(rows) == len(pe.garment_kinds()) + len(pe.picture_kinds())
    assert not below_baseline(rows), pe.table(rows)
    by_kind = {r.kind: r for r in rows}
    # a garment on a coloured backdrop or with margins around it defeats the plain resize; the garment preparation holds
    for kind in ("on colour", "off-centre, margins"):
        assert by_kind[kind].deployed_pct > by_kind[kind].baseline_pct + 20, pe.table(rows)
