"""The deployed preprocessing: an image file (or the test split's own files) to the model's input.

One torch-free path, used by everything that feeds an exported model: the demo and its API,
`toolkit predict`, `toolkit verify` (which proves this path against the training pipeline's
own test transform) and int8 calibration. It needs NumPy and Pillow only, so the ``[serve]``
install has it.

    decode   open_image: an image in an accepted format, limits checked before pixels are decoded,
             EXIF orientation applied, transparency composited onto white
    prepare  model_pixels: the model's uint8 input, HxW or HxWxC, by the dataset's named
             preparation (datasets.Preparation): "digit" (mnist_digit) or "resize"
    normalize  uint8 NCHW -> float32 NCHW exactly as training normalizes: (x / 255 - mean) / std
               (model_input: skipped for a graph that takes uint8 and normalizes inside)
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.core.datasets import preparation_for
from toolkit.core.errors import ToolkitError, first_line, shown

if TYPE_CHECKING:
    from PIL import Image

    from toolkit.core.manifest import Manifest, Normalization

MAX_SIDE = 4096  # pixels a side; larger images are refused before decoding
# modes with an unambiguous 8-bit reading; 16-bit / float / exotic colour spaces are refused
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK"}
WORK_SIDE = 256  # pixels: a digit is prepared at most this large, a phone photo costs what a sketch does
MNIST_STROKE = 2.4  # stroke width of the median MNIST test digit in its 20x20 box (2 x area / perimeter)
# Pillow's formats whose header gives the size of the frame that is decoded (the first; JPEG opens MPO,
# with more frames after it, PPM covers PGM/PBM/PNM). ICO and ICNS hold inner images of their own sizes.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
ACCEPTED_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF or PNM"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm")


# ----------------------------------------------------------------------------- decode

_FILTERS_LOCK = threading.Lock()
_READER_MODULES = r"PIL\.(\w+ImagePlugin|ImageFile|TiffTags)$"


def _pillow():
    """Pillow's Image module, with the warnings its readers give about a file made errors (filters by
    module, put in front once and again whenever something reset the filters: thread-safe, unlike
    catch_warnings around each decode in a server's threads): a file Pillow has doubts about is
    refused in one line, never log noise."""
    from PIL import Image

    if not any(f[0] == "error" and getattr(f[3], "pattern", None) == _READER_MODULES for f in warnings.filters):
        with _FILTERS_LOCK:
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
            warnings.filterwarnings("error", module=_READER_MODULES)
    return Image


def _stream(source):
    """(name shown in errors, what Pillow opens) for a path or encoded bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the file", io.BytesIO(bytes(source))
    path = Path(source)
    if not path.is_file():
        if path.exists():  # a FIFO, a device, a folder: never opened (a FIFO would block)
            raise ToolkitError(f"{shown(path.name)} is not a regular file (a folder, FIFO or device): give an image file")
        raise ToolkitError(f"no such image file: {shown(path.name)}")
    return shown(path.name), path


def _opened(name: str, stream) -> "Image.Image":
    """Pillow's image of ``stream`` with its header read and nothing decoded, in an accepted format only:
    formats whose header gives the size of the one frame ``load`` decodes (the first). A container
    that decodes an inner image of its own size while opening (ICO) or when loaded (ICNS), and every
    other format, is refused before any pixel is decoded. Any warning Pillow gives is the refusal."""
    Image = _pillow()
    try:
        im = Image.open(stream, formats=ACCEPTED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ToolkitError(f"the image is too large: at most {MAX_SIDE}x{MAX_SIDE} pixels") from None
    except Warning as w:
        raise ToolkitError(f"{name} could not be read ({first_line(w)})") from None
    except Exception:  # noqa: BLE001 - whatever a decoder raises on a file it cannot read
        raise ToolkitError(f"{name} is not an image in an accepted format ({ACCEPTED_NAMES})") from None
    w, h = im.size
    if w == 0 or h == 0:
        raise ToolkitError(f"the image is empty ({w}x{h} pixels)")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ToolkitError(f"the image is {w}x{h} pixels: at most {MAX_SIDE}x{MAX_SIDE}")
    return im


def decoded_pixels(source) -> int:
    """The pixels ``open_image`` would decode from ``source`` (a path or encoded bytes), read from the
    header alone: what a pixel budget must count. An image it refuses counts 0 (refused when decoded)."""
    try:
        name, stream = _stream(source)
        with _opened(name, stream) as im:
            w, h = im.size
    except ToolkitError:
        return 0
    return w * h


def open_image(source) -> "Image.Image":
    """A fully decoded, upright Pillow image from a path, encoded bytes, a Pillow image or an array;
    anything that is not a usable image is one ToolkitError line."""
    from PIL import Image

    if source is None or (isinstance(source, str) and not source.strip()):
        raise ToolkitError("no image given: upload an image or draw a digit")
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise ToolkitError("the image is empty (0 pixels)")
        source = Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Image.Image):
        im = source
        w, h = im.size
        if w == 0 or h == 0:
            raise ToolkitError(f"the image is empty ({w}x{h} pixels)")
        if w > MAX_SIDE or h > MAX_SIDE:
            raise ToolkitError(f"the image is {w}x{h} pixels: at most {MAX_SIDE}x{MAX_SIDE}")
    else:
        im = _opened(*_stream(source))
    if im.mode not in SUPPORTED_MODES:
        raise ToolkitError(f"unsupported image mode {im.mode!r}: use 8-bit grayscale, palette, RGB or RGBA")
    declared = im.size
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data, or a warning Pillow gave
        raise ToolkitError(f"the image could not be decoded ({type(exc).__name__}: {first_line(exc)})") from None
    if im.size != declared:  # what was decoded is not what the header said: never what was budgeted
        raise ToolkitError(f"the image decoded to {im.size[0]}x{im.size[1]} pixels, not the {declared[0]}x{declared[1]} its header declares")
    return upright(im)


def upright(im) -> "Image.Image":
    """The image as it is meant to be seen: a phone's JPEG stores its pixels sideways and says so in
    the EXIF orientation tag. A tag that cannot be applied is ignored, as viewers do."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block leaves the pixels as stored
        return im


def on_white(im) -> "Image.Image":
    """RGB, with any transparency composited onto white (a sketchpad's empty canvas is transparent)."""
    from PIL import Image

    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- prepare

def _otsu(values: np.ndarray) -> float:
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def _rank(a: np.ndarray, size: int, op) -> np.ndarray:
    """A square minimum or maximum filter (``op``: np.minimum or np.maximum) of odd ``size``, edges
    replicated: separable, each pass the element-wise op over the ``size`` shifted copies."""
    r = size // 2
    padded = np.pad(a, r, mode="edge")
    h, w = a.shape
    rows = padded[0:h]
    for i in range(1, size):
        rows = op(rows, padded[i:i + h])
    out = rows[:, 0:w]
    for j in range(1, size):
        out = op(out, rows[:, j:j + w])
    return out


def paper_surface(gray: np.ndarray) -> np.ndarray:
    """The paper under the ink, light ink on dark paper: a quadratic surface in x and y (uniform
    grey, light falling off across the page or towards the corners), fitted by least squares to
    the pixels that are not ink, found by iteration: the darkest 15% first (a digit enlarged from
    a small scan can cover over half its picture), then every pixel within three robust standard
    deviations above the fit. A surface this smooth cannot follow a
    stroke, so a stroke of any width stays ink (a minimum filter can only span a fixed width, and
    took the wide, soft strokes of an enlarged low-resolution scan for paper)."""
    from PIL import Image

    h, w = gray.shape
    scale = min(1.0, 48.0 / max(h, w))  # the fit needs the paper's shape, not its detail
    small = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    if scale < 1.0:
        small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)

    def terms(rows: int, cols: int) -> np.ndarray:
        y, x = (np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in (rows, cols))
        yy, xx = (a.ravel() for a in np.meshgrid(y, x, indexing="ij"))
        return np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], axis=1)

    a = terms(small.height, small.width)
    v = np.asarray(small, dtype=np.float64).ravel()
    paper = v <= np.percentile(v, 15)
    for _ in range(5):
        coef = np.linalg.lstsq(a[paper], v[paper], rcond=None)[0]
        residual = v - a @ coef
        spread = 1.4826 * np.median(np.abs(residual[paper] - np.median(residual[paper]))) + 1.0  # robust sd, never 0
        paper = residual < 3.0 * spread
    return (terms(h, w) @ coef).reshape(h, w).astype(np.float32)


def mnist_digit(im) -> np.ndarray:
    """A (28, 28) uint8 digit as MNIST has them: a light stroke on black, fitted into a 20x20 box
    (aspect kept) and centred by its centre of mass in the 28x28 frame (LeCun et al.'s recipe),
    from a drawing or a photo of one digit on paper of any shade.

    Each step beyond LeCun's recipe is kept because it wins on some kind of input and loses on
    none (bench/preparation_eval.py measures every kind against the plain recipe): the paper is
    estimated as a smooth surface and subtracted (grey paper, uneven light), the ink is
    thresholded (Otsu's method, and never below a fifth of the peak; a lone noisy pixel is not
    ink) and stretched to full white, a stroke much thinner than MNIST's is dilated towards it and
    one at least twice as thick is eroded towards it (bold type, markers). The width is measured
    at half the strokes' level and only far outside MNIST's own range is it changed, so the wide,
    soft strokes of enlarged low-resolution scans are kept (docs/preparation.md). A 28x28 image is taken as an MNIST digit and left alone
    (inverted if it is dark on light).
    """
    from PIL import Image

    gray_im = on_white(im).convert("L")
    gray = np.asarray(gray_im, dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    light_paper = float(np.median(border)) > 127
    if gray.shape == (28, 28):  # already an MNIST digit (inverted if dark on light)
        return np.clip(255.0 - gray if light_paper else gray, 0, 255).astype(np.uint8)
    # work at a bounded size: a phone photo and a sketchpad canvas cost the same
    scale = min(1.0, WORK_SIDE / max(gray_im.size))
    if scale < 1.0:
        size = (max(1, round(gray_im.width * scale)), max(1, round(gray_im.height * scale)))
        gray = np.asarray(gray_im.resize(size, Image.Resampling.BOX), dtype=np.float32)
    if light_paper:
        gray = 255.0 - gray  # ink light on dark, as MNIST
    ink = np.clip(gray - paper_surface(gray), 0, None)
    peak = float(np.percentile(ink, 99.9))
    if peak < 24:
        raise ToolkitError("no digit found: the image is blank (draw or upload a digit)")
    # ink or paper: Otsu's threshold on the ink signal, never below a fifth of its peak
    threshold = max(_otsu(ink * (255.0 / peak)) * peak / 255.0, 0.2 * peak)
    # ink where the 3x3 neighbourhood has ink too: a lone noisy pixel is not a stroke, a 2-pixel line is
    box = np.pad(ink, 1, mode="edge")
    local = sum(box[i:i + ink.shape[0], j:j + ink.shape[1]] for i in range(3) for j in range(3)) / 9.0
    mask = (ink > threshold) & (local > 0.6 * threshold)
    if not mask.any():
        raise ToolkitError("no digit found: the image is blank (draw or upload a digit)")
    # ink as MNIST draws it: full white inside strokes, soft edges, nothing on the paper
    strokes = np.clip((ink - 0.5 * threshold) / max(1e-6, (np.percentile(ink[mask], 90) - 0.5 * threshold)), 0, 1) * 255.0
    strokes *= _rank(mask, 3, np.maximum)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # stroke width: twice the area over the perimeter of the ink at half the strokes' level, so that
    # the soft edge of a blurred or enlarged stroke is not counted as width
    core = ink > 0.5 * np.percentile(ink[mask], 90)
    edge = (core & ~_rank(core, 3, np.minimum))[top:bottom, left:right]  # on the whole image: the crop touches its ink
    width = 2.0 * core[top:bottom, left:right].sum() / max(1, edge.sum())
    return fit_and_centre(_towards_mnist_stroke(strokes[top:bottom, left:right], width))


def _towards_mnist_stroke(crop: np.ndarray, width: float) -> np.ndarray:
    """The cropped digit with a stroke far from MNIST's width moved towards it: a marker's eroded, a thin
    pen's dilated, never by more than a sliver of the digit's size."""
    long_side = max(crop.shape)
    target = MNIST_STROKE * long_side / 20.0
    limit = max(1, long_side // 12)
    if width > 2.0 * target:  # a marker: thinned towards MNIST's stroke
        return _rank(crop, 2 * min(limit, int(round((width - target) / 2))) + 1, np.minimum)
    if width < 0.6 * target and round((target - width) / 2) >= 1:  # a thin pen: dilated towards it
        crop = _rank(np.pad(crop, limit), 2 * min(limit, int(round((target - width) / 2))) + 1, np.maximum)
        rows, cols = np.nonzero(crop > 0.15 * 255)  # the dilated digit, without the margin added for it
        if rows.size:
            crop = crop[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return crop


def fit_and_centre(crop: np.ndarray, box: int = 20, frame: int = 28) -> np.ndarray:
    """LeCun's last step: the cropped digit (light on black) fitted into ``box`` x ``box`` with its
    aspect kept (anti-aliased), placed in a ``frame`` x ``frame`` image so that its centre of mass
    is the frame's centre (as far as the frame allows)."""
    from PIL import Image

    h, w = crop.shape
    s = box / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.clip(np.asarray(Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
                               dtype=np.float32), 0, 255)
    total = small.sum()
    if total <= 0:
        raise ToolkitError("no digit found: the image is blank (draw or upload a digit)")
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    half = frame / 2
    y0 = int(np.clip(round(half - cy), 0, frame - small.shape[0]))
    x0 = int(np.clip(round(half - cx), 0, frame - small.shape[1]))
    out = np.zeros((frame, frame), dtype=np.float32)
    out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return np.clip(out, 0, 255).astype(np.uint8)


def resized_image(im, size: int, channels: int) -> np.ndarray:
    """The whole picture as (size, size, 3) RGB or (size, size) grayscale uint8; an image already
    that size is passed through unchanged."""
    from PIL import Image

    im = on_white(im)
    if channels == 1:
        im = im.convert("L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def garment(im, side: int = 28) -> np.ndarray:
    """A (side, side) uint8 image as Fashion-MNIST made its own: grey, the object light on black
    (inverted when the border is light, as with a product photo on white), the background's level
    taken away (a grey or coloured backdrop becomes black, as white does), trimmed to the object
    and its longest side fitted to the frame, centred. An image already
    ``side`` x ``side`` is only turned light-on-dark, so the dataset's own images pass unchanged."""
    from PIL import Image

    gray = np.asarray(on_white(im).convert("L"), dtype=np.uint8)

    def border() -> np.ndarray:
        return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])

    if np.median(border()) > 127:  # a light background: the object becomes light on black
        gray = 255 - gray
    if gray.shape == (side, side):
        return gray.copy()
    # the background as black, whatever its shade (a coloured or grey backdrop is not part of the
    # object): its level subtracted and the rest stretched back to the full range, so that a
    # white background is left exactly as it was
    background = int(np.median(border()))
    if background > 0:
        gray = np.clip((gray.astype(np.float32) - background) * (255.0 / (255 - background)), 0, 255).astype(np.uint8)
    ink = gray > 24  # the object: clearly above the background
    if ink.any():
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        gray = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = gray.shape
    scale = side / max(h, w)
    small = Image.fromarray(gray).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    frame = Image.new("L", (side, side), 0)
    frame.paste(small, ((side - small.width) // 2, (side - small.height) // 2))
    return np.asarray(frame, dtype=np.uint8)


def model_pixels(image, manifest: Manifest) -> np.ndarray:
    """Any image, as the manifest's model saw its training data: uint8 HxW (one channel) or HxWxC."""
    im = open_image(image)
    channels, height, width = manifest.chw
    preparation = preparation_for(manifest.dataset, channels)
    if preparation == "digit":
        return mnist_digit(im)
    if preparation == "garment":
        return garment(im, height)
    if height != width:
        raise ToolkitError(f"this model takes {height}x{width} images: only square inputs are prepared here")
    return resized_image(im, height, channels)


# ----------------------------------------------------------------------------- normalize

def normalize(pixels: np.ndarray, normalization: Normalization) -> np.ndarray:
    """uint8 NCHW -> float32 NCHW as the manifest's normalization says, in the order and precision
    training uses (torchvision's ToTensor + Normalize, and the fast pipeline): x / (1 / scale),
    then - mean, then / std, each rounded to float32. So this gives the training pipeline's
    test inputs bit for bit."""
    if pixels.ndim != 4:
        raise ToolkitError(f"expected a batch of NCHW images, got an array of shape {pixels.shape}")
    mean = np.asarray(normalization.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(normalization.std, dtype=np.float32)[None, :, None, None]
    x = pixels.astype(np.float32) / np.float32(1.0 / normalization.scale)
    return (x - mean) / std


def model_input(pixels: np.ndarray, manifest: Manifest) -> np.ndarray:
    """uint8 NCHW images -> what the manifest's model takes: float32 normalized here, or the uint8
    pixels themselves for a graph that normalizes them inside (``input.dtype`` "uint8"); NHWC
    for a graph that takes its input channels last (``input.layout``)."""
    if manifest.input.dtype == "uint8":
        x = np.asarray(pixels, dtype=np.uint8)
    else:
        x = normalize(pixels, manifest.normalization)
    if manifest.input.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def to_input(pixels: np.ndarray, manifest: Manifest) -> np.ndarray:
    """One image's uint8 HxW or HxWxC pixels -> the batch of one the manifest's model takes."""
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if chw.shape != manifest.chw:
        raise ToolkitError(f"this model takes {manifest.chw} (CHW) images, the preprocessed image is {chw.shape}")
    return model_input(chw[None], manifest)


def as_image(chw: np.ndarray) -> np.ndarray:
    """One uint8 CHW image from a test split -> HxW or HxWxC, as an image file holds it."""
    return chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)


def png_bytes(chw: np.ndarray) -> bytes:
    """One uint8 CHW image encoded as a PNG file in memory (lossless: decoding gives the pixels back)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(as_image(chw))).save(buf, format="PNG")
    return buf.getvalue()
