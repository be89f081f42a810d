"""The deployed preprocessing (toolkit.inference.preprocess) against the training pipeline, on real MNIST and on
CIFAR files in the real format: the same pixels, the same normalized inputs, safe readers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import RECIPES, manifest_for
from toolkit.data import loaders as data_mod
from toolkit.data import sources
from toolkit.inference import preprocess, splits
from toolkit.core.datasets import DATASETS, facts
from toolkit.core.errors import ToolkitError
from toolkit.core.manifest import Normalization
from toolkit.models.recipes import load_recipe


def _with(recipe, **data_fields):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=data_fields)})


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_the_deployed_readers_give_torchvisions_test_split(mnist_root, dataset):
    images, labels, classes = splits.read_test_split(dataset, mnist_root)
    x, y, tv_classes = data_mod.split_arrays(dataset, mnist_root, train=False, download=False)
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, x.numpy()) and np.array_equal(labels, y.numpy()) and classes == tv_classes == list(facts(dataset).classes)


def test_fashion_mnist_facts_are_measured_and_its_images_pass_the_garment_preparation_unchanged(mnist_root):
    """The recorded mean/std are the training split's, to the 4 decimals written; the test images go
    through decode -> 'garment' preparation unchanged (they are already light on black, 28x28);
    a product photo (dark object on white, any size) is turned into that form."""
    from PIL import Image

    x, _, _ = data_mod.split_arrays("fashion_mnist", mnist_root, train=True, download=False)
    pixels = x.numpy().astype(np.float64) / 255
    spec = facts("fashion_mnist")
    assert abs(pixels.mean() - spec.mean[0]) < 5e-5 and abs(pixels.std() - spec.std[0]) < 5e-5
    images, _, _ = splits.read_test_split("fashion_mnist", mnist_root)
    manifest = manifest_for("fashion_mnist", classes=list(spec.classes))
    back = np.stack([preprocess.model_pixels(preprocess.png_bytes(img), manifest) for img in images[:500]])
    assert np.array_equal(back, images[:500, 0])
    photo = Image.new("RGB", (300, 200), "white")
    photo.paste((40, 40, 60), (120, 20, 180, 180))  # a dark, tall object on white
    garment = preprocess.model_pixels(photo, manifest)
    assert garment.shape == (28, 28) and garment[14, 14] > 200 and garment[0, 0] == 0 and garment[14, 2] == 0
    assert (garment > 128).any(axis=1).sum() == 28  # the object's longest side fills the frame


@pytest.mark.parametrize("pipeline", ["fast", "dataloader"])
def test_deployed_normalization_is_the_training_test_transform_bit_for_bit(mnist_root, pipeline):
    """fine4's test transform (torchvision's ToTensor + Normalize, or the fast pipeline's) on the full
    MNIST test set, against preprocess.normalize with the normalization an export records."""
    recipe = _with(load_recipe(RECIPES / "fine4.toml"), pipeline=pipeline)
    x_train, labels = sources.test_inputs(recipe, mnist_root, download=False)
    images, deployed_labels, _ = splits.read_test_split("mnist", mnist_root)
    spec = facts("mnist")
    x = preprocess.normalize(images, Normalization(scale=1 / 255, mean=list(spec.mean), std=list(spec.std)))
    assert x.dtype == np.float32 and x.shape == x_train.shape == (10_000, 1, 28, 28)
    assert np.array_equal(deployed_labels, labels)
    assert np.array_equal(x, x_train)  # every one of the 7,840,000 values, bit for bit


def test_albumentations_normalization_agrees_within_one_float32_rounding(mnist_root):
    """albumentations normalizes as (x - mean * 255) / (std * 255), another order of float32 operations:
    it differs from the deployed path by at most one unit in the last place of values below 4."""
    recipe = load_recipe(RECIPES / "fine4.toml")
    recipe = _with(recipe, pipeline="dataloader", augment=recipe.data.augment.model_copy(update={"library": "albumentations"}))
    x_train, _ = sources.test_inputs(recipe, mnist_root, download=False)
    images, _, _ = splits.read_test_split("mnist", mnist_root)
    spec = facts("mnist")
    x = preprocess.normalize(images, Normalization(scale=1 / 255, mean=list(spec.mean), std=list(spec.std)))
    diff = np.abs(x - x_train)
    assert np.abs(x).max() < 4 and diff.max() <= 2.0**-22  # one ulp of a float32 in [2, 4)


def test_png_files_of_the_test_set_decode_to_the_same_pixels(mnist_root):
    """The pipeline path verify uses: each real MNIST test image written as a PNG file and read back
    through the deployed preparation gives the dataset's pixels (all 10,000)."""
    images, _, _ = splits.read_test_split("mnist", mnist_root)
    manifest = manifest_for("mnist")
    back = np.stack([preprocess.model_pixels(preprocess.png_bytes(img), manifest) for img in images])
    assert np.array_equal(back, images[:, 0])


def test_cifar_test_split_readers_on_real_format_files(cifar_root):
    for dataset in ("cifar10", "cifar100"):
        images, labels, classes = splits.read_test_split(dataset, cifar_root)
        x, y, tv_classes = data_mod.split_arrays(dataset, cifar_root, train=False, download=False)
        assert images.shape[1:] == (3, 32, 32) and np.array_equal(images, x.numpy()) and np.array_equal(labels, y.numpy())
        assert classes == tv_classes and len(classes) == facts(dataset).num_classes
        manifest = manifest_for(dataset, (3, 32, 32), classes=[str(i) for i in range(100 if dataset == "cifar100" else 10)])
        back = np.stack([preprocess.model_pixels(preprocess.png_bytes(img), manifest) for img in images[:20]])
        assert np.array_equal(back.transpose(0, 3, 1, 2), images[:20])  # 32x32 RGB: no resize, no conversion loss


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_cifar_pickle_that_would_run_code_is_refused(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch = cifar_root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _Boom(), "labels": []}))
    with pytest.raises(ToolkitError) as err:
        splits.read_test_split("cifar10", cifar_root)
    assert "\n" not in str(err.value) and "refused posix.system" in str(err.value) and not (tmp_path / "PWNED").exists()


def test_missing_and_malformed_test_files(tmp_path):
    assert splits.read_test_split("mnist", tmp_path) is None
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ToolkitError) as err:
        splits.read_test_split("mnist", tmp_path)
    assert "\n" not in str(err.value) and "t10k-" in str(err.value)


def test_every_dataset_names_its_classes_once():
    for name, spec in DATASETS.items():
        assert spec.input_shape == (spec.channels, spec.size, spec.size) and len(spec.mean) == len(spec.std) == spec.channels
        assert spec.classes is None or len(spec.classes) == spec.num_classes
        assert set(spec.test_files) <= set(spec.files)
    with pytest.raises(ToolkitError, match="unknown dataset"):
        facts("imagenet")


def test_normalize_refuses_a_single_image():
    with pytest.raises(ToolkitError, match="NCHW"):
        preprocess.normalize(np.zeros((28, 28), np.uint8), Normalization(scale=1 / 255, mean=[0.0], std=[1.0]))


def test_model_pixels_take_files_bytes_and_arrays_alike(mnist_root, tmp_path):
    images, _, _ = splits.read_test_split("mnist", mnist_root)
    manifest = manifest_for("mnist")
    path = Path(tmp_path) / "d.png"
    path.write_bytes(preprocess.png_bytes(images[7]))
    from_file = preprocess.model_pixels(str(path), manifest)
    assert np.array_equal(from_file, preprocess.model_pixels(path.read_bytes(), manifest))
    assert np.array_equal(from_file, preprocess.model_pixels(images[7, 0], manifest))


@pytest.mark.parametrize("variety, least_mean", [("grey noisy paper", 0.7), ("paper texture, uneven light", 0.7),
                                                  ("photographed (low contrast, JPEG)", 0.7), ("thick strokes", 0.6), ("off-centre, small", 0.8)])
def test_a_digit_on_bad_paper_prepares_like_the_clean_digit(variety, least_mean):
    """bench/digit_variety.py's images (here in Pillow's own font, so no font package is needed):
    each digit on grey noisy paper, textured paper in uneven light, photographed, drawn thick or
    small and off-centre must become nearly the 28x28 MNIST digit the clean drawing becomes
    (correlation of the pixels). The fixed fraction-of-peak threshold before took grey paper for
    ink: its mean correlations on the first three were 0.18, 0.32 and 0.15."""
    import io

    from PIL import Image

    from bench.digit_variety import varieties

    make = varieties(np.random.default_rng(0))
    correlations = []
    for digit in range(10):
        clean = preprocess.mnist_digit(Image.open(io.BytesIO(make["plain fonts"](None, digit))))
        other = preprocess.mnist_digit(Image.open(io.BytesIO(make[variety](None, digit))))
        correlations.append(np.corrcoef(clean.astype(float).ravel(), other.astype(float).ravel())[0, 1])
        assert other[:, :2].max() == other[:, -2:].max() == 0 or other[:2].max() == other[-2:].max() == 0  # fitted in 20x20 with a margin
    assert np.mean(correlations) >= least_mean and min(correlations) >= 0.3, correlations


def test_a_fifo_or_a_folder_is_not_a_regular_file(tmp_path):
    """Opening a FIFO would block until someone writes to it; it is named, never opened."""
    import os

    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ToolkitError, match="is not a regular file") as err:
            preprocess.open_image(str(path))
        assert "\n" not in str(err.value)
    with pytest.raises(ToolkitError, match="no such image file"):
        preprocess.open_image(str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------- what a pixel budget counts (#40)

def _encoded(im, fmt: str, **options) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _lying_ico(inner_side: int) -> bytes:
    """An ICO whose directory says 16x16 and which holds a PNG of ``inner_side`` pixels a side."""
    import struct

    from PIL import Image

    png = _encoded(Image.new("L", (inner_side, inner_side)), "PNG")
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def _gif_with_small_screen(side: int) -> bytes:
    """A GIF whose logical screen says 16x16 while its first frame is ``side`` pixels a side."""
    import struct

    from PIL import Image

    data = bytearray(_encoded(Image.new("L", (side, side)), "GIF"))
    data[6:10] = struct.pack("<HH", 16, 16)
    return bytes(data)


def _containers() -> dict[str, bytes]:
    from PIL import Image

    small, huge = Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("RGB", (4000, 4000))
    return {
        "gif: first frame larger than its screen": _gif_with_small_screen(3000),
        "gif: a huge later frame": _encoded(small, "GIF", save_all=True, append_images=[huge]),
        "tiff: a huge later page": _encoded(small, "TIFF", save_all=True, append_images=[huge]),
        "mpo: a huge later frame": _encoded(small, "MPO", save_all=True, append_images=[huge]),
        "webp: animated": _encoded(small, "WEBP", save_all=True, append_images=[small.rotate(90)]),
        "png: animated, a later frame": _encoded(small, "PNG", save_all=True, append_images=[small.rotate(90)]),
    }


@pytest.mark.parametrize("case", list(_containers()))
def test_the_pixels_counted_from_the_header_are_the_pixels_decoded(case):
    """A pixel budget counts ``decoded_pixels`` (the header alone); ``open_image`` decodes exactly that
    many, whatever frames or pages a container carries after the first."""
    data = _containers()[case]
    counted = preprocess.decoded_pixels(data)
    im = preprocess.open_image(data)
    assert counted == im.size[0] * im.size[1] > 0, (case, counted, im.size)


@pytest.mark.parametrize("fmt", ["ICO (a 9000x9000 PNG inside a 16x16 entry)", "ICNS", "TGA", "PCX", "SGI", "QOI", "DDS", "PSD-like junk"])
def test_a_container_with_inner_sizes_or_an_unaccepted_format_is_refused_before_any_decoding(fmt, monkeypatch):
    """#40: an ICO whose header says 16x16 while it holds a 9000x9000 PNG was decoded in full while its
    pixels were counted. Formats whose header does not give what is decoded (ICO, ICNS) and formats
    outside the accepted list are refused from the header, with nothing decoded."""
    from PIL import Image, ImageFile

    data = _lying_ico(9000) if fmt.startswith("ICO") else b"8BPS" + bytes(100) if fmt == "PSD-like junk" else \
        _encoded(Image.new("RGB", (64, 64)), fmt)
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    assert preprocess.decoded_pixels(data) == 0
    with pytest.raises(ToolkitError, match=r"not an image in an accepted format \(PNG, JPEG, GIF, BMP, WebP, TIFF or PNM\)"):
        preprocess.open_image(data)
    assert loads == []


def _png_with_invalid_apng_chunk() -> bytes:
    """A PNG with an acTL chunk that says 0 frames: Pillow reads it with a UserWarning ("Invalid APNG")."""
    import struct
    import zlib

    from PIL import Image

    png = _encoded(Image.new("L", (28, 28), 128), "PNG")
    body = b"acTL" + struct.pack(">II", 0, 0)
    chunk = struct.pack(">I", 8) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]  # after the signature (8) and IHDR (25)


def test_a_warning_pillow_gives_about_a_file_is_a_one_line_refusal(capfd):
    """#40: Pillow's raw UserWarning line in the server log. A file Pillow has doubts about is refused in
    one line instead, and nothing is printed."""
    with pytest.raises(ToolkitError, match="could not be read .*Invalid APNG") as err:
        preprocess.open_image(_png_with_invalid_apng_chunk())
    assert "\n" not in str(err.value)
    assert preprocess.decoded_pixels(_png_with_invalid_apng_chunk()) == 0
    assert "Warning" not in capfd.readouterr().err
