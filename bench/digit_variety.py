"""Digits that are not MNIST: accuracy of an export per variety of generated image, through the
demo's own path (toolkit.inference.catalog: decode, MNIST-style preparation, normalize, model).

Each variety renders the digits 0-9 in every font installed on the machine (Debian's font
packages: fonts-dejavu-core, fonts-liberation2, fonts-freefont-ttf, fonts-urw-base35, ...),
then changes one thing: stroke width, slant, grey noisy paper, paper texture with uneven light,
position, a photographed look. Images are written as PNG (or JPEG for the photographed look)
and classified from the file, as a user's upload is.

    python bench/digit_variety.py EXPORT_DIR [--json out.json]

Prints a markdown table: variety, images, accuracy. Seeded: the same fonts give the same images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANVAS = 160
# symbol and dingbat fonts have no digits worth the name
SKIP_FONTS = ("symbol", "dingbat", "d050000l", "opensymbol", "z003")


def fonts() -> list[str]:
    out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
    paths = sorted({line.split(":")[0].strip() for line in out.splitlines() if line.strip()})
    return [p for p in paths if p.lower().endswith((".ttf", ".otf", ".pfb", ".t1")) and not any(s in p.lower() for s in SKIP_FONTS)]


def render(font_path: str | None, digit: int, size: int = 110, stroke: int = 0) -> "Image.Image":
    """Black digit on white, centred on a CANVAS x CANVAS grey-level image (font None: Pillow's own)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size)
    im = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(im)
    draw.text((CANVAS / 2, CANVAS / 2), str(digit), fill=0, font=font, anchor="mm", stroke_width=stroke, stroke_fill=0)
    return im


def varieties(rng: np.random.Generator):
    """name -> function(font, digit) -> (encoded file bytes)."""
    from PIL import Image, ImageFilter

    def png(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def plain(f, d):
        return png(render(f, d))

    def thick(f, d):
        return png(render(f, d, stroke=7))

    def thin(f, d):  # the white paper grows into the strokes
        return png(render(f, d).filter(ImageFilter.MaxFilter(3)))

    def slant(f, d):
        shear = rng.choice([-0.35, 0.35])
        return png(render(f, d).transform((CANVAS, CANVAS), Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0),
                                          resample=Image.Resampling.BILINEAR, fillcolor=255))

    def grey_noisy_paper(f, d):
        ink = np.asarray(render(f, d), np.float32) / 255  # 1 paper, 0 ink
        paper, dark = 175.0, 60.0
        img = dark + (paper - dark) * ink + rng.normal(0, 22, ink.shape)
        return png(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))

    def texture_and_light(f, d):
        ink = np.asarray(render(f, d), np.float32) / 255
        texture = np.asarray(Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC), np.float32)
        ramp = np.linspace(0.55, 1.0, CANVAS)[None, :] * np.linspace(1.0, 0.8, CANVAS)[:, None]  # light from one side
        paper = (200 + 0.15 * (texture - 128)) * ramp
        img = paper * (0.25 + 0.75 * ink)
        return png(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))

    def off_centre(f, d):
        big = Image.new("L", (3 * CANVAS, 2 * CANVAS), 255)
        small = render(f, d).resize((CANVAS // 2, CANVAS // 2), Image.Resampling.LANCZOS)
        big.paste(small, (int(rng.integers(0, 2 * CANVAS)), int(rng.integers(0, CANVAS))))
        return png(big)

    def photographed(f, d):
        ink = np.asarray(render(f, d).filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255
        img = 95 + 60 * ink + rng.normal(0, 6, ink.shape)  # low contrast: grey ink on grey paper
        rgb = np.stack([img * 1.02, img, img * 0.9], -1)  # a warm cast
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=70)
        return buf.getvalue()

    return {"plain fonts": plain, "thick strokes": thick, "thin strokes": thin, "slant": slant, "grey noisy paper": grey_noisy_paper,
            "paper texture, uneven light": texture_and_light, "off-centre, small": off_centre, "photographed (low contrast, JPEG)": photographed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--json", dest="json_out", type=Path)
    args = parser.parse_args()

    from toolkit.inference.catalog import Catalog
    from toolkit.core.errors import ToolkitError

    catalog = Catalog.from_dirs([args.export_dir])
    key = catalog.keys("mnist")[0]
    font_list = fonts()
    results = {}
    for name, make in varieties(np.random.default_rng(0)).items():
        right = total = failed = 0
        for font in font_list:
            for digit in range(10):
                total += 1
                try:
                    right += catalog.classify(make(font, digit), key, top_k=1).best == str(digit)
                except ToolkitError:
                    failed += 1
        results[name] = {"images": total, "accuracy": 100.0 * right / total, "unreadable": failed}
    report = {"export": str(args.export_dir), "artifact": key, "fonts": len(font_list), "results": results}
    print(f"{len(font_list)} fonts, artifact {key}\n")
    print("| variety | images | accuracy |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['images']} | {r['accuracy']:.1f}% |")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
