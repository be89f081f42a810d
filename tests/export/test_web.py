"""#43: `toolkit export --format web`, a static page that classifies in the browser, proven in Debian's Chromium
(driven by Playwright) against the toolkit's own Python path: the page served by a plain static file server,
every request elsewhere refused (the runner's route; ``blocked`` must stay empty)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tests.helpers import draw, mnist_test_set, one_line_error, run_cli

if not (os.environ.get("TOOLKIT_CHROMIUM") or shutil.which("chromium")):
    if os.environ.get("TOOLKIT_REQUIRE_BROWSER"):  # CI installs it: missing there is a failure
        raise RuntimeError("TOOLKIT_REQUIRE_BROWSER is set but chromium is missing (apt-get install chromium)")
    pytestmark = pytest.mark.skip(reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def web_export(serving_export, mnist_root, tmp_path_factory) -> Path:
    """The serving model's run exported again with the page for its fp32 file and for its CPU int8 file."""
    from toolkit.core.manifest import Manifest
    from toolkit.export import export

    run = Path(Manifest.load(serving_export).source.checkpoint).parent
    out = tmp_path_factory.mktemp("web")
    quiet = Console(file=io.StringIO())
    export(run, fmt="web", out=out, console=quiet)
    entry = export(run, fmt="web", precision="int8", out=out, data_dir=mnist_root, download=False, console=quiet)
    return Path(entry["export_dir"])


@pytest.fixture(scope="module")
def page(web_export):
    from toolkit.inference.web_runner import web_runner

    run = web_runner(web_export / "web", classes=10)
    yield run
    assert run.page.blocked == [], f"the page asked for files outside its folder: {run.page.blocked}"
    run.page.close()


def test_the_web_export_is_a_checked_folder(web_export):
    from toolkit.core.errors import ToolkitError
    from toolkit.core.files import tree_digest
    from toolkit.core.manifest import Manifest
    from toolkit.export.to_web import ORT_WEB_FILES, ORT_WEB_VERSION

    manifest = Manifest.load(web_export)
    for name, source, precision in (("web", "model.fp32.onnx", "fp32"), ("web-int8", "model.int8.onnx", "int8")):
        art = manifest.artifact(name)
        folder = web_export / name
        assert (art.format, art.precision, art.get("onnxruntime_web")) == ("web", precision, ORT_WEB_VERSION)
        assert (art.sha256, art.bytes) == tree_digest(folder)
        names = {p.name for p in folder.iterdir()}
        assert names == {"index.html", "prepare.mjs", "toolkit.mjs", "model.json", "NOTICE.txt", source, *ORT_WEB_FILES}
        assert (folder / source).read_bytes() == (web_export / source).read_bytes()
        spec = json.loads((folder / "model.json").read_text())
        assert spec["classes"] == manifest.classes and spec["preparation"] == "digit" and spec["model"] == source
        assert spec["input"] == {"name": "input", "dtype": "float32", "layout": "NCHW", "chw": [1, 28, 28]}
    # a page changed after export is refused, as a changed model file is
    copy = web_export.parent / "tampered" / web_export.name
    shutil.copytree(web_export, copy)
    (copy / "web" / "index.html").write_text("<script>alert(1)</script>")
    with pytest.raises(ToolkitError, match="do not match the manifest"):
        Manifest.load(copy)
    shutil.rmtree(copy.parent)


def test_onnx_runtime_web_is_pinned(web_export, tmp_path):
    from toolkit.export.to_web import ORT_WEB_FILES, cache_dir

    fake = tmp_path / "dist"
    shutil.copytree(cache_dir(), fake)
    (fake / next(iter(ORT_WEB_FILES))).write_bytes(b"// another version\n")
    run = Path(json.loads((web_export / "manifest.json").read_text())["source"]["checkpoint"]).parent
    proc = run_cli("export", run, "--format", "web", "--out", tmp_path / "out", "--ort-web", fake)
    assert "sha256 differs" in one_line_error(proc) and not (tmp_path / "out").exists()
    proc = run_cli("export", run, "--format", "web", "--precision", "fp16", "--out", tmp_path / "out")
    assert one_line_error(proc) == "error: --format web has no fp16: fp32 | int8"


def test_the_page_classifies_mnist_files_as_toolkit_predict_does(web_export, page, mnist_root, tmp_path):
    """1,000 raw MNIST test PNGs through the page's own decoding, preparation and model: the labels of
    `toolkit predict` on the same files (the fp32 ONNX file), the same scores, the same model inputs."""
    from toolkit.core.manifest import Manifest
    from toolkit.inference import preprocess

    images, _ = mnist_test_set(mnist_root)
    files = tmp_path / "digits"
    files.mkdir()
    sources = []
    for i in range(1000):
        sources.append(preprocess.png_bytes(images[i][None]))
        (files / f"{i:04d}.png").write_bytes(sources[-1])
    logits, pixels, failed = page.files(sources)
    assert failed == []
    proc = run_cli("predict", web_export, files, "--artifact", f"{web_export.name}/model.fp32.onnx", "--json", "--top-k", "10", timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = {Path(r["file"]).name: r for r in map(json.loads, proc.stdout.splitlines())}  # one JSON line per file
    predicted = [found[f"{i:04d}.png"] for i in range(1000)]
    classes = Manifest.load(web_export).classes
    labels = np.array([classes.index(p["label"]) for p in predicted])
    assert (logits.argmax(1) == labels).mean() >= 0.999
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    theirs = np.array([[p["top"][c] for c in classes] for p in predicted])
    assert np.abs(scores - theirs).max() <= 1e-4
    manifest = Manifest.load(web_export)
    python_pixels = np.stack([preprocess.model_pixels(s, manifest).reshape(-1) for s in sources])
    assert np.array_equal(pixels, python_pixels)  # a PNG decodes to the same pixels in Chromium as in Pillow
    # the machine interface, on a file relative to the page
    shutil.copyfile(files / "0000.png", web_export / "web" / "probe.png")
    try:
        answer = page.page.evaluate("() => window.toolkitClassify('probe.png')")
    finally:
        (web_export / "web" / "probe.png").unlink()
    assert answer["label"] == predicted[0]["label"]
    expected = preprocess.to_input(preprocess.model_pixels(sources[0], manifest), manifest).reshape(-1)
    assert np.abs(np.array(answer["input"], dtype=np.float32) - expected).max() == 0


def test_the_page_prepares_each_kind_of_file_as_python_does(web_export, page, mnist_root):
    """bench/preparation_eval.py's kinds (scans, pens, paper, photos, JPEG, the sketchpad): the page's 28x28
    input within 1 grey level of Python's on 99% of the pixels or more, and the same accuracy per kind."""
    from bench import preparation_eval as pe
    from toolkit.core.errors import ToolkitError
    from toolkit.core.manifest import Manifest
    from toolkit.inference import preprocess
    from toolkit.inference.runtime import ort_runner

    manifest = Manifest.load(web_export)
    python_model = ort_runner(web_export / "model.fp32.onnx", "ort-cpu")
    images, labels = mnist_test_set(mnist_root)
    pick = pe.sample(len(images), 12, seed=3)
    for k, kind in enumerate(pe.digit_kinds()):
        rng = np.random.default_rng([3, k])
        sources = [kind.render(images[i], rng) for i in pick]
        logits, pixels, failed = page.files(sources)
        ours, refused = [], []
        for j, s in enumerate(sources):
            try:
                ours.append(preprocess.model_pixels(s, manifest).reshape(-1))
            except ToolkitError:
                ours.append(np.zeros(784, np.uint8))
                refused.append(j)
        assert failed == refused, kind.name
        ours = np.stack(ours)
        near = (np.abs(pixels.astype(int) - ours.astype(int)) <= 1).mean()
        assert near >= 0.99, f"{kind.name}: {near:.4f} of the pixels within 1 grey level"
        x = np.concatenate([preprocess.to_input(p.reshape(28, 28), manifest) for p in ours])
        python_right = (python_model(x).argmax(1) == labels[pick]).sum()
        page_right = (logits.argmax(1) == labels[pick]).sum()
        assert page_right == python_right, f"{kind.name}: {page_right} right in the page, {python_right} in Python"


def test_a_digit_drawn_on_the_sketchpad_is_classified(web_export, page):
    from playwright.sync_api import expect

    p = page.page.page  # the runner's Page, then Playwright's
    draw(p, p.locator("#pad"), 90)  # a 7
    expect(p.locator("#label")).to_have_text("7", timeout=30_000)
    assert p.locator("#bars .bar").count() == 3
    if os.environ.get("TOOLKIT_WEB_SCREENSHOT"):  # docs/web.png: TOOLKIT_WEB_SCREENSHOT=docs/web.png python -m pytest -k sketchpad
        p.set_viewport_size({"width": 900, "height": 560})
        p.screenshot(path=os.environ["TOOLKIT_WEB_SCREENSHOT"])
    p.locator("#clear").click()
    expect(p.locator("#label")).to_have_text("")


def test_the_int8_page_agrees_with_onnx_runtime(web_export, mnist_root):
    from toolkit.core.manifest import Manifest
    from toolkit.inference import preprocess
    from toolkit.inference.runtime import ort_runner
    from toolkit.inference.web_runner import web_runner

    images, _ = mnist_test_set(mnist_root)
    x = preprocess.model_input(images[:2000, None], Manifest.load(web_export))
    ours = ort_runner(web_export / "model.int8.onnx", "ort-cpu")(x)
    run = web_runner(web_export / "web-int8", classes=10)
    try:
        theirs = np.concatenate([run(x[i:i + 250]) for i in range(0, len(x), 250)])
    finally:
        run.page.close()
    assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.999


def test_verify_and_bench_give_the_page_its_rows(web_export, mnist_root):
    from toolkit.check.bench import bench
    from toolkit.check.verify import verify
    from toolkit.core.manifest import Manifest

    quiet = Console(file=io.StringIO())
    verify(web_export, data_dir=mnist_root, limit=500, download=False, console=quiet)
    manifest = Manifest.load(web_export)
    for name in ("web", "web-int8"):
        parity = manifest.artifact(name).parity["chromium-ort-web"]
        assert parity.passed and parity.pipeline_agreement >= 99.0, (name, parity)
    report = bench(web_export, batches=(1,), min_seconds=0.05, min_iters=5, include_torch=False, console=quiet)
    rows = {r["artifact"]: r for r in report["results"] if r["runtime"] == "chromium-ort-web"}
    assert set(rows) == {"web", "web-int8"} and rows["web-int8"]["vs"] == "web"
    assert "ONNX Runtime Web (Chromium)" in (web_export / "MODEL_CARD.md").read_text()


def test_toolkit_serve_serves_the_page_cross_origin_isolated(web_export):
    """`toolkit serve` gives the page at /web/ (static files, COOP/COEP so that ONNX Runtime Web may use two
    threads); the page loaded from there classifies as it does from a plain file server."""
    import urllib.request

    from tests.helpers import free_port
    from toolkit.inference.web_runner import browser_page
    from toolkit.serve.server import serve

    running, url = serve([web_export], port=free_port(), api_only=True, block=False, console=None)
    try:
        with urllib.request.urlopen(url + "web/") as answer:
            assert "toolkitReady" in answer.read().decode() and answer.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(url + f"web/{web_export.name}/web-int8/model.json") as answer:
            assert json.loads(answer.read())["model"] == "model.int8.onnx"
        with browser_page() as page:  # the module's page holds the process's one Playwright driver: share its browser
            page.goto(url + "web/")
            page.wait_for_function("() => window.toolkitModel !== undefined", timeout=60_000)
            isolated, threads, cores = page.evaluate("() => [self.crossOriginIsolated, window.toolkitModel.threads, navigator.hardwareConcurrency]")
            assert isolated and threads == min(2, cores)
            assert page.evaluate("() => window.toolkitClassify('model.json').catch(e => 'refused')") == "refused"  # not an image
    finally:
        running.close()


def test_the_cards_hosting_line_runs_as_written(web_export):
    """The model card's line that hosts the page, run as printed: the page and its model come back."""
    import re
    import shlex
    import subprocess
    import sys
    import time
    import urllib.request

    card = (web_export / "MODEL_CARD.md").read_text()
    (line,) = [m for m in re.findall(r"^python -m http\.server .*$", card, re.M)]
    command, _, comment = line.partition("#")
    words = shlex.split(command)
    assert "--directory" in words and comment.strip() == "then open http://127.0.0.1:8000/"
    assert re.search(r"`web/` \(fp32\): [\d,]+ bytes in all \(the model 37,170 bytes, ONNX Runtime Web [\d.]+ [\d,]+ bytes\)", card)
    server = subprocess.Popen([sys.executable, *words[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/model.json", timeout=5) as answer:
                    assert json.loads(answer.read())["model"] == "model.fp32.onnx"
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the card's server did not answer")
        with urllib.request.urlopen("http://127.0.0.1:8000/") as answer:
            assert "toolkit.mjs" in answer.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_last_page_closed_stops_the_browser(web_export):
    """Playwright's sync API allows one driver per thread: once no page is open, the shared one is gone, so
    that other code in the process (the demo's browser tests) may start its own."""
    from toolkit.inference import web_runner

    run = web_runner.web_runner(web_export / "web", classes=10)
    assert "browser" in web_runner._BROWSER
    users = web_runner._BROWSER["users"]
    run.page.close()
    assert web_runner._BROWSER["users"] == users - 1
    if users == 1:
        assert "browser" not in web_runner._BROWSER and "driver" not in web_runner._BROWSER

