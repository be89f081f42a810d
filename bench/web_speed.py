"""The web export's page in Chromium: how soon it answers a drawing, and how many digits a second it classifies.

    python bench/web_speed.py EXPORT_DIR --data-dir ../shared/data [--folder web] [--files 1000] [--json out.json]

The page's folder is served by a local static file server that lets the browser cache (as any host does),
once plainly (ONNX Runtime Web on one thread) and once cross-origin isolated (COOP/COEP headers, as `toolkit
serve` sends them: two threads). For each: the first load (nothing cached) and a second one (files cached),
each from the navigation's start to the answer to a 7 drawn with the mouse at once (the page's own clock,
``window.toolkitFirstAnswer``); then MNIST test PNGs classified one at a time through the page's whole path
(decoding, preparation, the model; batch 1), timed inside the page. Prints a table; ``--json`` writes it as a
docs/records table record (bench/report.py renders it).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THROUGHPUT = """async (files) => {
  const blobs = files.map((b) => new Blob([Uint8Array.from(atob(b), (c) => c.charCodeAt(0))], {type: 'image/png'}));
  await window.toolkitClassifyBlob(blobs[0]);
  const t0 = performance.now();
  for (const blob of blobs) await window.toolkitClassifyBlob(blob);
  return (performance.now() - t0) / blobs.length;
}"""


def server(folder: Path, isolated: bool):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def end_headers(self) -> None:
            self.send_header("Cache-Control", "max-age=3600")
            if isolated:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def first_answer(page, url: str) -> float:
    """ms from the navigation's start to the answer to a 7 drawn as soon as the sketchpad is there."""
    page.goto(url, wait_until="domcontentloaded")
    box = page.locator("#pad").bounding_box()
    cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 90
    points = [(-0.6, -0.8), (0.6, -0.8), (-0.1, 0.9)]
    page.mouse.move(cx + points[0][0] * r, cy + points[0][1] * r)
    page.mouse.down()
    for u, v in points[1:]:
        page.mouse.move(cx + u * r, cy + v * r, steps=8)
    page.mouse.up()
    page.wait_for_function("() => window.toolkitFirstAnswer !== undefined", timeout=60_000)
    return page.evaluate("() => window.toolkitFirstAnswer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--folder", default="web", help="the page's folder in the export: web (fp32) or web-int8")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from toolkit.core.environment import cpu_line
    from toolkit.core.files import resolve_data_dir
    from toolkit.inference import preprocess
    from toolkit.inference.splits import read_test_split
    from toolkit.inference.web_runner import CHROMIUM_ARGS, chromium

    images, _, _ = read_test_split("mnist", resolve_data_dir(args.data_dir))
    files = [base64.b64encode(preprocess.png_bytes(img)).decode() for img in images[: args.files]]
    folder = args.export / args.folder
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        version = browser.version
        try:
            for isolated in (False, True):
                httpd = server(folder, isolated)
                url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
                context = browser.new_context()
                page = context.new_page()
                cold = first_answer(page, url)
                warm = first_answer(page, url)  # the same context: the files are in its cache
                backend, threads = page.evaluate("() => [window.toolkitModel.backend, window.toolkitModel.threads]")
                ms = page.evaluate(THROUGHPUT, files)
                context.close()
                httpd.shutdown()
                rows.append(["cross-origin isolated (as toolkit serve sends it)" if isolated else "plain static server", f"{backend}, {threads}",
                             f"{cold:,.0f}", f"{warm:,.0f}", f"{ms:.2f}", f"{1000 / ms:,.0f}"])
        finally:
            browser.close()
    size = sum(f.stat().st_size for f in folder.iterdir())
    record = {"kind": "table", "title": "web-speed", "machine": f"{cpu_line()}; Chromium {version} (headless, Debian)",
              "date": datetime.now(timezone.utc).date().isoformat(),
              "command": f"python bench/web_speed.py EXPORT --folder {args.folder} --files {args.files}",
              "source": f"the script's --json; {args.export.name}/{args.folder}: {size:,} bytes",
              "columns": ["served by", "backend, threads", "first answer, nothing cached (ms)", "first answer, files cached (ms)",
                          "ms per digit (decode, prepare, model)", "digits/s"],
              "align": ["left", "left", "right", "right", "right", "right"], "rows": rows}
    print(f"{record['machine']}; {record['source']}")
    for row in [record["columns"], *rows]:
        print(" | ".join(row))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
