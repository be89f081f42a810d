"""The deployed image preparation against a plain baseline, on many kinds of input a user hands over.

A model's test images are rendered the ways people upload them (dark on white, light on dark,
large and small, upscaled from a low-resolution scan, blurred, drawn with thin and thick pens,
off-centre, on grey, uneven or textured paper, JPEG, rotated, photographed in perspective, drawn
on the demo's sketchpad), written as files, and classified twice by the same exported model:
once through the deployed path (``toolkit.inference.preprocess.model_pixels``, what the demo, its API and
``toolkit predict`` run) and once through a plain baseline preparation. The baseline is the
reference the deployed path must never fall below: a "robust" step earns its place only where
it wins on some kind and loses on none.

    digits    MNIST test images; baseline: LeCun's recipe (invert a light page, crop to the ink,
              fit into 20x20, centre by the centre of mass in 28x28). Also real handwriting that
              is not MNIST: scikit-learn's 8x8 digits (UCI, 43 writers other than MNIST's),
              upscaled as an old scan is.
    garments  Fashion-MNIST test images as product photos; baseline: grey, inverted on a light
              background, the whole picture resized.
    pictures  the same garments through ``resized_image`` (an image-folder model's preparation);
              baseline: the whole picture converted and resized with Pillow's default filter.

    python bench/preparation_eval.py EXPORT_DIR [--per-kind 1000] [--json out.json] [--png grid.png]

Prints a markdown table (kind, images, deployed, baseline, deployed - baseline). Seeded: the
same arguments give the same images. tests/inference/test_preparation_eval.py runs it on a sample.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKETCH_CANVAS = 300  # toolkit/serve/demo.py's gr.Sketchpad(canvas_size=(300, 300)) ...
SKETCH_BRUSH = 16  # ... and its brush's default_size


# ----------------------------------------------------------------------------- rendering helpers

def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _gray(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def ink_map(digit: np.ndarray, height: int) -> np.ndarray:
    """A 28x28 light-on-dark image as ink coverage in [0, 1], enlarged (bicubic) so that its
    28-pixel frame is ``height`` pixels tall."""
    from PIL import Image

    big = Image.fromarray(digit).resize((height, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big, np.float32) / 255.0, 0, 1)


def on_canvas(ink: np.ndarray, shape: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    """``ink`` placed with its top-left corner at ``at`` (row, col) on an empty canvas of ``shape``."""
    canvas = np.zeros(shape, np.float32)
    r, c = at
    h, w = ink.shape
    canvas[r:r + h, c:c + w] = np.maximum(canvas[r:r + h, c:c + w], ink[: shape[0] - r, : shape[1] - c])
    return canvas


def pen_stroke(digit: np.ndarray, height: int, width: float) -> np.ndarray:
    """The digit redrawn as a pen would draw it: its skeleton traced by a round nib of ``width``
    pixels, with the 28-pixel frame ``height`` pixels tall; coverage in [0, 1] with soft edges."""
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import skeletonize

    ink = ink_map(digit, height)
    skeleton = skeletonize(ink > 0.5)
    if not skeleton.any():
        return ink
    distance = distance_transform_edt(~skeleton)
    return np.clip(width / 2.0 + 0.5 - distance, 0, 1).astype(np.float32)


def page(ink: np.ndarray, paper: float | np.ndarray = 255.0, ink_level: float = 0.0) -> np.ndarray:
    """Coverage -> grey levels: ``ink_level`` where the pen was, ``paper`` elsewhere."""
    return paper + (ink_level - paper) * ink


def centred(ink: np.ndarray, side: int) -> np.ndarray:
    pad = (side - ink.shape[0]) // 2
    return on_canvas(ink, (side, side), (pad, pad))


# ----------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class Kind:
    name: str
    render: Callable[[np.ndarray, np.random.Generator], bytes]  # (28x28 light-on-dark test image, rng) -> file bytes
    what: str


def as_file(image: np.ndarray, rng=None) -> bytes:
    """The test image itself as a PNG file: the kind every preparation must pass unchanged."""
    from PIL import Image

    return _png(Image.fromarray(image))


def digit_kinds() -> list[Kind]:
    from PIL import Image, ImageFilter

    def dark_on_white(d, rng):
        return _png(_gray(page(centred(ink_map(d, 140), 160))))

    def light_on_dark(d, rng):
        return _png(_gray(255.0 * centred(ink_map(d, 140), 160)))

    def large(d, rng):
        side = int(rng.integers(600, 1001))
        return _png(_gray(page(centred(ink_map(d, int(side * 0.8)), side))))

    def small(d, rng):
        side = int(rng.integers(20, 41))
        return _png(_gray(page(ink_map(d, side))))

    def upscaled(low: int):
        def make(d, rng):  # a low-resolution scan of a digit that fills its cell, enlarged with bicubic as an old scan is
            rows, cols = np.nonzero(d > 64)
            side = max(np.ptp(rows), np.ptp(cols)) + 1
            top, left = (rows.min() + rows.max() + 1 - side) // 2, (cols.min() + cols.max() + 1 - side) // 2
            cell = np.pad(d, side)[top + side:top + 2 * side, left + side:left + 2 * side]  # square around the ink
            low_res = Image.fromarray(cell).resize((low, low), Image.Resampling.BOX)
            return _png(_gray(255.0 - np.asarray(low_res.resize((160, 160), Image.Resampling.BICUBIC), np.float32)))
        return make

    def blurred(d, rng):
        im = _gray(page(centred(ink_map(d, 140), 160)))
        return _png(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(3, 6)))))

    def pen(lo: float, hi: float):
        def make(d, rng):  # the 20-pixel digit of a 28-pixel frame is ~100 px tall here
            return _png(_gray(page(centred(pen_stroke(d, 140, float(rng.uniform(lo, hi))), 160))))
        return make

    def off_centre(d, rng):
        h, w = int(rng.integers(240, 481)), int(rng.integers(240, 481))
        size = int(rng.integers(50, 90))
        at = (int(rng.integers(0, h - size)), int(rng.integers(0, w - size)))
        return _png(_gray(page(on_canvas(ink_map(d, size), (h, w), at))))

    def grey_paper(d, rng):
        ink = centred(ink_map(d, 140), 160)
        paper, ink_level = float(rng.uniform(140, 200)), float(rng.uniform(20, 70))
        return _png(_gray(page(ink, paper, ink_level) + rng.normal(0, 12, ink.shape)))

    def uneven_light(d, rng):
        ink = centred(ink_map(d, 140), 160)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:160, 0:160] / 160.0 - 0.5
        light = 0.75 + 0.45 * (np.cos(angle) * xs + np.sin(angle) * ys)  # one side twice as bright as the other
        return _png(_gray(page(ink, 235.0, 30.0) * light))

    def textured_paper(d, rng):
        ink = centred(ink_map(d, 140), 160)
        grain = np.asarray(Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).resize((160, 160), Image.Resampling.BICUBIC), np.float32)
        fibres = rng.normal(0, 10, (160, 160))
        return _png(_gray(page(ink, 215.0 + 0.2 * (grain - 128) + fibres, 40.0)))

    def jpeg(d, rng):
        return _jpeg(_gray(page(centred(ink_map(d, 140), 160))), int(rng.integers(10, 31)))

    def rotated(d, rng):
        im = _gray(page(centred(ink_map(d, 140), 160)))
        return _png(im.rotate(float(rng.choice([-1, 1]) * rng.uniform(5, 15)), Image.Resampling.BICUBIC, fillcolor=255))

    def photographed(d, rng):
        im = _gray(page(centred(ink_map(d, 140), 200), 190.0, 45.0))
        # a camera above the page at an angle: the four corners moved inwards by up to 15%
        corners = np.array([[0, 0], [0, 200], [200, 200], [200, 0]], np.float64)
        moved = corners + rng.uniform(0, 30, corners.shape) * np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]])
        im = im.transform((200, 200), Image.Transform.QUAD, tuple(moved.ravel()), Image.Resampling.BICUBIC, fillcolor=190)
        a = np.asarray(im.filter(ImageFilter.GaussianBlur(1.2)), np.float32) + rng.normal(0, 5, (200, 200))
        rgb = np.stack([a * 1.03, a, a * 0.9], -1)  # a warm cast
        return _jpeg(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"), 75)

    def sketchpad(d, rng):
        # the demo's canvas: transparent, black brush strokes; a person draws the digit large, anywhere
        size = int(rng.integers(150, 261))
        ink = pen_stroke(d, size, SKETCH_BRUSH)
        at = tuple(int(rng.integers(0, SKETCH_CANVAS - size + 1)) for _ in range(2))
        alpha = on_canvas(ink, (SKETCH_CANVAS, SKETCH_CANVAS), at)
        rgba = np.zeros((SKETCH_CANVAS, SKETCH_CANVAS, 4), np.uint8)
        rgba[..., 3] = np.clip(np.rint(255 * alpha), 0, 255)
        return _png(Image.fromarray(rgba, "RGBA"))

    return [
        Kind("MNIST file (28x28)", as_file, "the test image itself, as a PNG"),
        Kind("dark on white", dark_on_white, "160 px, black ink on white"),
        Kind("light on dark", light_on_dark, "160 px, white ink on black"),
        Kind("large (600-1000 px)", large, "a big scan"),
        Kind("small (20-40 px)", small, "a thumbnail"),
        Kind("upscaled from 8x8", upscaled(8), "the digit's square at 8x8, then bicubic to 160 px (an old low-resolution scan)"),
        Kind("upscaled from 16x16", upscaled(16), "the digit's square at 16x16 (as USPS), then bicubic to 160 px"),
        Kind("blurred", blurred, "Gaussian blur, radius 3-6 px at 160 px"),
        Kind("thin pen (2-5 px)", pen(2, 5), "skeleton redrawn with a thin nib (MNIST's is ~12 px at this size)"),
        Kind("medium pen (8-14 px)", pen(8, 14), "skeleton redrawn with a nib of MNIST's width"),
        Kind("thick pen (20-30 px)", pen(20, 30), "skeleton redrawn with a thick marker"),
        Kind("off-centre, margins", off_centre, "a 50-90 px digit anywhere on a 240-480 px page"),
        Kind("grey paper, noise", grey_paper, "paper 140-200, ink 20-70, noise sd 12"),
        Kind("uneven light", uneven_light, "light falling off across the page, 2:1"),
        Kind("textured paper", textured_paper, "blotchy paper with fibres"),
        Kind("JPEG (quality 10-30)", jpeg, "heavy compression artefacts"),
        Kind("rotated (5-15 deg)", rotated, "turned either way"),
        Kind("photographed", photographed, "grey paper, perspective, blur, warm cast, JPEG, RGB"),
        Kind("sketchpad", sketchpad, f"the demo's {SKETCH_CANVAS}x{SKETCH_CANVAS} transparent canvas, {SKETCH_BRUSH} px brush"),
    ]


def garment_kinds() -> list[Kind]:
    from PIL import Image, ImageFilter

    def on_white(d, rng):  # a product photo: the garment dark on a white studio background
        side = int(rng.integers(160, 400))
        return _png(_gray(page(centred(ink_map(d, int(side * 0.9)), side))))

    def on_black(d, rng):
        side = int(rng.integers(160, 400))
        return _png(_gray(255.0 * centred(ink_map(d, int(side * 0.9)), side)))

    def on_colour(d, rng):
        side = int(rng.integers(160, 400))
        cover = centred(ink_map(d, int(side * 0.9)), side)[..., None]
        background = rng.uniform(120, 255, 3)
        garment = rng.uniform(0, 90, 3)
        return _png(Image.fromarray(np.clip(np.rint(background + (garment - background) * cover), 0, 255).astype(np.uint8), "RGB"))

    def small(d, rng):
        side = int(rng.integers(16, 28))
        return _png(_gray(255.0 * ink_map(d, side)))

    def large(d, rng):
        side = int(rng.integers(600, 1001))
        return _png(_gray(page(centred(ink_map(d, int(side * 0.85)), side))))

    def margins(d, rng):
        h, w = int(rng.integers(200, 401)), int(rng.integers(200, 401))
        size = int(rng.integers(100, min(h, w)))
        at = (int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))
        return _png(_gray(page(on_canvas(ink_map(d, size), (h, w), at))))

    def jpeg(d, rng):
        return _jpeg(_gray(page(centred(ink_map(d, 180), 200))), int(rng.integers(20, 51)))

    def soft(d, rng):
        return _png(_gray(page(centred(ink_map(d, 180), 200))).filter(ImageFilter.GaussianBlur(2.0)))

    return [
        Kind("Fashion-MNIST file (28x28)", as_file, "the test image itself"),
        Kind("on white", on_white, "160-400 px, the garment dark on a white studio background"),
        Kind("on black", on_black, "160-400 px, light on black as the dataset"),
        Kind("on colour", on_colour, "RGB, a dark garment on a coloured background"),
        Kind("small (16-27 px)", small, "a thumbnail"),
        Kind("large (600-1000 px)", large, "a big photo on white"),
        Kind("off-centre, margins", margins, "the garment anywhere on a larger page"),
        Kind("JPEG (quality 20-50)", jpeg, "compressed photo on white"),
        Kind("soft focus", soft, "Gaussian blur radius 2 at 200 px"),
    ]


def picture_kinds() -> list[Kind]:
    """For ``resized_image`` (image folders and CIFAR-style models): the whole picture is the input,
    so the kinds are sizes, colour, compression; the garment is light on black as in training."""
    from PIL import Image

    def scaled(lo: int, hi: int):
        def make(d, rng):
            side = int(rng.integers(lo, hi + 1))
            return _png(_gray(255.0 * ink_map(d, side)))
        return make

    def rgb(d, rng):
        a = 255.0 * ink_map(d, 112)
        return _png(Image.fromarray(np.clip(np.rint(np.stack([a, a, a], -1)), 0, 255).astype(np.uint8), "RGB"))

    def jpeg(d, rng):
        return _jpeg(_gray(255.0 * ink_map(d, 112)), int(rng.integers(20, 51)))

    def wide(d, rng):  # not square: resized to the model's square, as the training folder's images were
        a = 255.0 * ink_map(d, 112)
        return _png(_gray(np.pad(a, ((0, 0), (28, 28)))))

    return [
        Kind("at size (28x28)", as_file, "the test image itself"),
        Kind("small (14-24 px)", scaled(14, 24), "a thumbnail"),
        Kind("large (200-1000 px)", scaled(200, 1000), "a big photo"),
        Kind("RGB", rgb, "three equal channels, 112 px"),
        Kind("JPEG (quality 20-50)", jpeg, "112 px, compressed"),
        Kind("wide (2:1)", wide, "112x168, not square"),
    ]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's copy of the UCI optical digits: 1,797 real handwritten digits from 43 people,
    none of them MNIST's writers, as 8x8 grey levels 0-16 (32x32 bitmaps counted in 4x4 blocks)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255.0 / 16.0)).astype(np.float32), data.target.astype(np.int64)


def render_scan(low: np.ndarray, side: int = 160) -> bytes:
    """An 8x8 light-on-dark grid as a user's scan of it: dark ink on white, bicubic to ``side``."""
    from PIL import Image

    big = Image.fromarray(np.clip(np.rint(255.0 - low), 0, 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    return _png(big)


# ----------------------------------------------------------------------------- baselines

def _light_on_dark(im) -> np.ndarray:
    from toolkit.inference.preprocess import on_white

    gray = np.asarray(on_white(im).convert("L"), np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 255.0 - gray if np.median(border) > 127 else gray


def plain_digit(im) -> np.ndarray:
    """The reference: grey, inverted on a light page, cropped to the ink, fitted in 20x20 and
    centred by mass in 28x28 (LeCun's last step, the deployed path's own), nothing else."""
    from toolkit.inference.preprocess import fit_and_centre

    gray = _light_on_dark(im)
    if gray.shape == (28, 28):
        return np.clip(gray, 0, 255).astype(np.uint8)
    rows, cols = np.nonzero(gray > 0.25 * gray.max())  # the ink's bounding box
    return fit_and_centre(gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1])


def plain_garment(im) -> np.ndarray:
    """The reference: grey, inverted on a light background, the whole picture resized to 28x28."""
    from PIL import Image

    gray = _gray(_light_on_dark(im))
    return np.asarray(gray.resize((28, 28), Image.Resampling.BICUBIC), np.uint8)


def plain_picture(im, size: int = 28, channels: int = 1) -> np.ndarray:
    """The reference: the picture converted and resized with Pillow's default (bicubic) filter."""
    from toolkit.inference.preprocess import on_white

    im = on_white(im)
    im = im.convert("L") if channels == 1 else im
    return np.asarray(im.resize((size, size)), np.uint8)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Row:
    kind: str
    images: int
    deployed: int  # right answers through the deployed path
    baseline: int  # right answers through the baseline
    failed: int = 0  # files the deployed path refused (counted wrong)
    lost: int = 0  # images the baseline gets right and the deployed path wrong
    gained: int = 0  # ... and the other way round

    @property
    def worse_p(self) -> float:
        """One-sided exact McNemar p-value that the deployed path is worse than the baseline: of the
        images the two answer differently, how unlikely this many losses are if either were as good."""
        from scipy.stats import binomtest

        changed = self.lost + self.gained
        return binomtest(self.lost, changed, 0.5, alternative="greater").pvalue if changed else 1.0

    @property
    def deployed_pct(self) -> float:
        return 100.0 * self.deployed / self.images

    @property
    def baseline_pct(self) -> float:
        return 100.0 * self.baseline / self.images


def _classify(run, manifest, pixels: list[np.ndarray]) -> np.ndarray:
    from toolkit.inference.preprocess import to_input

    x = np.concatenate([to_input(p, manifest) for p in pixels])
    return np.concatenate([run(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)


def evaluate(run, manifest, files: list[bytes], labels: np.ndarray, deployed, baseline, kind: str) -> Row:
    """One kind: each file through ``deployed`` and ``baseline`` (image -> uint8 pixels), then the model."""
    from toolkit.core.errors import ToolkitError
    from toolkit.inference.preprocess import open_image

    ok, dep, base = [], [], []
    for f in files:
        im = open_image(f)
        base.append(baseline(im))
        try:
            dep.append(deployed(f))
            ok.append(True)
        except ToolkitError:
            dep.append(np.zeros_like(base[-1]))
            ok.append(False)
    ok = np.array(ok)
    dep_right = (_classify(run, manifest, dep) == labels) & ok
    base_right = _classify(run, manifest, base) == labels
    return Row(kind, len(files), int(dep_right.sum()), int(base_right.sum()), int((~ok).sum()),
               lost=int((base_right & ~dep_right).sum()), gained=int((dep_right & ~base_right).sum()))


def sample(count: int, per_kind: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=min(per_kind, count), replace=False))


def run_kinds(run, manifest, images: np.ndarray, labels: np.ndarray, kinds: list[Kind], deployed, baseline,
              per_kind: int, seed: int = 0, keep: dict | None = None) -> list[Row]:
    """Every kind on the same ``per_kind`` test images (seeded); ``keep[kind]`` gets the first file of each."""
    pick = sample(len(images), per_kind, seed)
    rows = []
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, k])
        files = [kind.render(images[i], rng) for i in pick]
        if keep is not None:
            keep[kind.name] = files[:4]
        rows.append(evaluate(run, manifest, files, labels[pick], deployed, baseline, kind.name))
    return rows


def digit_rows(run, manifest, root: Path, per_kind: int, seed: int = 0, deployed=None, keep: dict | None = None) -> list[Row]:
    """The digit kinds on MNIST's test split, then scikit-learn's real handwriting as a scan."""
    from toolkit.inference.preprocess import model_pixels
    from toolkit.inference.splits import read_test_split

    deployed = deployed or (lambda f: model_pixels(f, manifest))
    images, labels, _ = read_test_split("mnist", root)
    rows = run_kinds(run, manifest, images[:, 0], labels, digit_kinds(), deployed, plain_digit, per_kind, seed, keep)
    low, low_labels = sklearn_digits()
    pick = sample(len(low), per_kind, seed)
    files = [render_scan(low[i]) for i in pick]
    if keep is not None:
        keep["real handwriting (UCI 8x8 scans)"] = files[:4]
    rows.append(evaluate(run, manifest, files, low_labels[pick], deployed, plain_digit, "real handwriting (UCI 8x8 scans)"))
    return rows


def garment_rows(run, manifest, root: Path, per_kind: int, seed: int = 0, deployed=None, keep: dict | None = None) -> list[Row]:
    from toolkit.inference.preprocess import model_pixels
    from toolkit.inference.splits import read_test_split

    images, labels, _ = read_test_split("fashion_mnist", root)
    return run_kinds(run, manifest, images[:, 0], labels, garment_kinds(), deployed or (lambda f: model_pixels(f, manifest)),
                     plain_garment, per_kind, seed, keep)


def picture_rows(run, manifest, root: Path, per_kind: int, seed: int = 0, keep: dict | None = None) -> list[Row]:
    """A Fashion-MNIST model's own test images through ``resized_image`` (the preparation of a model
    trained on an image folder of them) against Pillow's plain resize."""
    from toolkit.inference.preprocess import open_image, resized_image
    from toolkit.inference.splits import read_test_split

    images, labels, _ = read_test_split("fashion_mnist", root)
    return run_kinds(run, manifest, images[:, 0], labels, picture_kinds(), lambda f: resized_image(open_image(f), 28, 1),
                     plain_picture, per_kind, seed, keep)


def table(rows: list[Row]) -> str:
    lines = ["| kind | images | deployed | baseline | deployed − baseline | gained / lost | p (worse) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        refused = f" ({r.failed} refused)" if r.failed else ""
        lines.append(f"| {r.kind} | {r.images} | {r.deployed_pct:.2f}%{refused} | {r.baseline_pct:.2f}% | "
                     f"{r.deployed_pct - r.baseline_pct:+.2f} pp | {r.gained} / {r.lost} | {r.worse_p:.3g} |")
    return "\n".join(lines)


def grid_png(path: Path, keep: dict[str, list[bytes]], prepare, rows: list[Row], title: str) -> None:
    """Per kind: example inputs as the user gives them, what the model sees after the deployed
    preparation, and the accuracy (deployed / baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.inference.preprocess import on_white, open_image

    by_kind = {r.kind: r for r in rows}
    n = len(keep)
    fig, axes = plt.subplots(n, 8, figsize=(12, 1.45 * n + 0.6))
    axes = np.atleast_2d(axes)
    for row, (kind, files) in enumerate(keep.items()):
        for j in range(4):
            given, seen = axes[row, 2 * j], axes[row, 2 * j + 1]
            if j < len(files):
                given.imshow(np.asarray(on_white(open_image(files[j]))), cmap="gray")
                try:
                    seen.imshow(prepare(files[j]), cmap="gray", vmin=0, vmax=255)
                except Exception:  # noqa: BLE001 - a refused file shows as an empty cell
                    pass
            given.set_axis_off()
            seen.set_axis_off()
        r = by_kind[kind]
        axes[row, 0].set_title(f"{kind}: {r.deployed_pct:.1f}% (plain {r.baseline_pct:.1f}%)", loc="left", fontsize=9, x=0.0)
    fig.suptitle(title + "\n(each pair: the file given, then what the model sees)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="an export of an MNIST or Fashion-MNIST model (its fp32 ONNX file is used)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data root with MNIST / FashionMNIST (default $TOOLKIT_DATA_DIR)")
    parser.add_argument("--per-kind", type=int, default=1000, help="test images per kind (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", action="store_true", help="a Fashion-MNIST model: also resized_image's kinds")
    parser.add_argument("--json", dest="json_out", type=Path)
    parser.add_argument("--png", type=Path, help="write a grid of examples per kind with what the model sees")
    args = parser.parse_args()

    import os

    from toolkit.inference.catalog import Catalog
    from toolkit.inference.preprocess import model_pixels

    root = args.data_dir or Path(os.environ.get("TOOLKIT_DATA_DIR", "../shared/data"))
    catalog = Catalog.from_dirs([args.export_dir])
    entry = next(catalog.entries[k] for k in catalog.keys() if catalog.entries[k].artifact.precision == "fp32")
    run, manifest = catalog.runner(entry), entry.manifest
    keep: dict[str, list[bytes]] = {}
    if manifest.dataset == "mnist":
        rows = digit_rows(run, manifest, root, args.per_kind, args.seed, keep=keep)
    elif manifest.dataset == "fashion_mnist":
        rows = garment_rows(run, manifest, root, args.per_kind, args.seed, keep=keep)
        if args.pictures:
            rows += picture_rows(run, manifest, root, args.per_kind, args.seed)
    else:
        raise SystemExit(f"error: {manifest.dataset} has no kinds here (mnist or fashion_mnist)")
    print(f"{entry.key}, {args.per_kind} test images per kind, seed {args.seed}\n")
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"artifact": entry.key, "per_kind": args.per_kind, "seed": args.seed,
                                             "rows": [r.__dict__ for r in rows]}, indent=2))
    if args.png:
        grid_png(args.png, keep, lambda f: model_pixels(f, manifest), rows, f"{entry.key}: deployed preparation per kind")


if __name__ == "__main__":
    main()
