"""The Open Inference Protocol (KServe v2) in `toolkit serve`: tritonclient.http with its defaults
against the running server, beside the demo and alone; protocol errors; batching that keeps
answers matched to their requests."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.helpers import free_port, mnist_test_set
from toolkit.inference.catalog import Catalog
from toolkit.core.manifest import Manifest, triton_model_name
from toolkit.serve.oip import Batcher
from toolkit.inference.preprocess import model_input, png_bytes

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (it is in the dev extra)")


@pytest.fixture(scope="module", params=["beside the demo", "api only"])
def v2_server(request, serving_export, mnist_root):
    from toolkit.serve.server import serve

    running, url = serve([serving_export], port=free_port(), data_dir=mnist_root, examples=0, max_upload="1mb",
                         api_only=request.param == "api only", block=False, console=None)
    yield running, url
    running.close()


@pytest.fixture(scope="module")
def digits(serving_export, mnist_root):
    """100 real MNIST test digits as the model's input, their labels and the logits the fp32 ONNX
    gives for each in this process (batch 1)."""
    manifest = Manifest.load(serving_export)
    images, labels = mnist_test_set(mnist_root)
    images, labels = images[:100, None], labels[:100]
    catalog = Catalog.from_dirs([serving_export])
    run = catalog.runner(catalog.entry(f"{serving_export.name}/model.fp32.onnx"))
    x = model_input(images, manifest)
    return images, labels, x, np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _names(serving_export) -> tuple[str, str]:
    manifest = Manifest.load(serving_export)
    fp32 = next(a for a in manifest.artifacts if a.precision == "fp32")
    int8 = next(a for a in manifest.artifacts if a.precision == "int8")
    return triton_model_name(manifest.source.recipe, fp32), triton_model_name(manifest.source.recipe, int8)


def test_tritonclient_reads_health_and_metadata_as_from_triton(v2_server, serving_export):
    running, url = v2_server
    manifest = Manifest.load(serving_export)
    fp32, int8 = _names(serving_export)
    # the names of the export's Triton repository (test_export checks the repository has these)
    assert (fp32, int8) == ("fine4_fp32", "fine4_int8")
    client = http.InferenceServerClient(url.removeprefix("http://").rstrip("/"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(fp32)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(fp32)
    assert meta["inputs"] == [{"name": manifest.input.name, "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": manifest.output.name, "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config(int8)
    assert config["name"] == int8 and config["max_batch_size"] >= 1
    assert {m["name"] for m in client.get_model_repository_index()} == {fp32, int8}
    with pytest.raises(Exception, match="unknown model"):
        client.get_model_metadata("no_such_model")


def test_100_real_digits_as_tensors_and_as_png_bytes(v2_server, serving_export, digits):
    running, url = v2_server
    images, labels, x, reference = digits
    fp32, _ = _names(serving_export)
    manifest = Manifest.load(serving_export)
    client = http.InferenceServerClient(url.removeprefix("http://").rstrip("/"))
    # binary tensors, the client's default; one request of 100 and 100 requests of one
    inp = http.InferInput(manifest.input.name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    batch = client.infer(fp32, [inp]).as_numpy(manifest.output.name)
    np.testing.assert_allclose(batch, reference, rtol=1e-5, atol=1e-5)
    assert (batch.argmax(1) == labels).mean() >= 0.98
    ones = []
    for i in range(len(x)):
        one = http.InferInput(manifest.input.name, [1, 1, 28, 28], "FP32")
        one.set_data_from_numpy(x[i:i + 1])
        ones.append(client.infer(fp32, [one]).as_numpy(manifest.output.name)[0])
    assert np.array_equal(np.argmax(ones, axis=1), reference.argmax(1))
    np.testing.assert_allclose(np.stack(ones), reference, rtol=1e-5, atol=1e-5)
    # JSON tensors in and out
    inp = http.InferInput(manifest.input.name, [4, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x[:4], binary_data=False)
    out = client.infer(fp32, [inp], outputs=[http.InferRequestedOutput(manifest.output.name, binary_data=False)])
    np.testing.assert_allclose(out.as_numpy(manifest.output.name), reference[:4], rtol=1e-5, atol=1e-5)
    # encoded PNG files, decoded by the deployed preprocessing: the same answers
    files = np.array([png_bytes(chw) for chw in images], dtype=np.object_)
    inp = http.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(files)
    from_png = client.infer(fp32, [inp]).as_numpy(manifest.output.name)
    np.testing.assert_allclose(from_png, reference, rtol=1e-5, atol=1e-5)
    # the classification extension: "score:index:label", best first
    top = client.infer(fp32, [inp], outputs=[http.InferRequestedOutput(manifest.output.name, class_count=2)]).as_numpy(manifest.output.name)
    assert top.shape == (100, 2)
    assert [int(row[0].decode().split(":")[1]) for row in top] == list(reference.argmax(1))


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_protocol_errors_are_json_with_4xx_and_the_server_keeps_serving(v2_server, serving_export, digits):
    running, url = v2_server
    fp32, _ = _names(serving_export)
    manifest = Manifest.load(serving_export)
    name = manifest.input.name
    infer = f"{url}v2/models/{fp32}/infer"
    good = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 1, 28, 28], "data": digits[2][0].ravel().tolist()}]}
    cases = {
        "unknown model": (f"{url}v2/models/no_such_model/infer", json.dumps(good).encode(), {}, 404, "unknown model"),
        "a path for a name": (f"{url}v2/models/..%2F..%2Fetc%2Fpasswd/infer", json.dumps(good).encode(), {}, 404, "no such v2 endpoint"),
        "version 2": (f"{url}v2/models/{fp32}/versions/2/infer", json.dumps(good).encode(), {}, 404, "version 1 only"),
        "not json": (infer, b"{nope", {}, 400, "not JSON"),
        "not text": (infer, b"\xff\xfe{}", {}, 400, "not JSON"),
        "nested lists": (infer, b"[" * 100_000, {}, 400, "nested too deeply"),
        "nested objects": (infer, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {}, 400, "nested too deeply"),
        "no inputs": (infer, b"{}", {}, 400, "exactly one input"),
        "wrong datatype": (infer, json.dumps({"inputs": [{**good["inputs"][0], "datatype": "FP64"}]}).encode(), {}, 400, "datatype"),
        "wrong shape": (infer, json.dumps({"inputs": [{**good["inputs"][0], "shape": [1, 3, 28, 28]}]}).encode(), {}, 400, "shape"),
        "short data": (infer, json.dumps({"inputs": [{**good["inputs"][0], "data": [0.0] * 5}]}).encode(), {}, 400, "elements"),
        "nan": (infer, json.dumps({"inputs": [{**good["inputs"][0], "data": ["NaN"] * 784}]}).encode(), {}, 400, "number|finite"),
        "unknown input": (infer, json.dumps({"inputs": [{**good["inputs"][0], "name": "other"}]}).encode(), {}, 400, "unknown input"),
        "header length too long": (infer, json.dumps(good).encode(), {"Inference-Header-Content-Length": "999999"}, 400, "outside"),
        "binary size wrong": (infer, json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 1, 28, 28],
                                                             "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 16,
                              {"Inference-Header-Content-Length": None}, 400, "bytes for shape"),
        "not an image": (infer, json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                        "data": [base64.b64encode(b"hello").decode()]}]}).encode(), {}, 400, "not an image"),
        "batch over max": (infer, json.dumps({"inputs": [{**good["inputs"][0], "shape": [100000, 1, 28, 28], "data": []}]}).encode(), {}, 400, ""),
        "unknown output": (infer, json.dumps({**good, "outputs": [{"name": "nope"}]}).encode(), {}, 400, "unknown output"),
    }
    for case, (where, body, headers, status, words) in cases.items():
        if headers.get("Inference-Header-Content-Length", "") is None:
            headers = {"Inference-Header-Content-Length": str(len(body) - 16)}
        got, answer = _post(where, body, headers)
        assert got == status and set(answer) == {"error"}, (case, got, answer)
        assert "\n" not in answer["error"] and re.search(words, answer["error"]), (case, answer)
        ok, result = _post(infer, json.dumps(good).encode())
        assert ok == 200 and np.argmax(result["outputs"][0]["data"]) == digits[1][0], f"after {case}"
    # a body over the limit (1 MB here) is refused from its declared length, before it is read
    import http.client
    from urllib.parse import urlparse

    where = urlparse(infer)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.putrequest("POST", where.path)
    conn.putheader("Content-Length", str(2 * 10**6))
    conn.endheaders()
    conn.send(b"x" * 1000)
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()
    ok, result = _post(infer, json.dumps(good).encode())
    assert ok == 200
    # unknown paths and methods under /v2 are protocol-shaped too
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}v2/models/{fp32}/infer", timeout=30)  # GET
    assert info.value.code == 405 and "not allowed" in json.loads(info.value.read())["error"]


def test_concurrent_requests_are_batched_and_stay_matched(v2_server, serving_export, digits):
    """64 clients at once, each with its own digit: every answer is its own digit's logits, and the
    server ran fewer batches than requests."""
    running, url = v2_server
    import tritonclient.http.aio as aio

    fp32, _ = _names(serving_export)
    manifest = Manifest.load(serving_export)
    _, _, x, reference = digits
    batcher = running.service.batchers[fp32]
    batches, requests = batcher.batches, batcher.requests

    async def all_at_once():
        client = aio.InferenceServerClient(url.removeprefix("http://").rstrip("/"), conn_limit=64)
        try:
            async def one(i):
                inp = aio.InferInput(manifest.input.name, [1, 1, 28, 28], "FP32")
                inp.set_data_from_numpy(x[i:i + 1])
                return (await client.infer(fp32, [inp])).as_numpy(manifest.output.name)[0]
            return await asyncio.gather(*(one(i % len(x)) for i in range(64)))
        finally:
            await client.close()

    answers = asyncio.run(all_at_once())
    for i, out in enumerate(answers):
        np.testing.assert_allclose(out, reference[i % len(x)], rtol=1e-5, atol=1e-5)
    assert batcher.requests - requests == 64
    assert batcher.batches - batches < 64


def test_batcher_fills_batches_up_to_its_limit_in_order():
    """Twenty single-row requests queued together: batches of 8, 8 and 4 (never over the limit),
    each answer its own request's rows; a request of 3 rows that does not fit waits for the next batch."""
    seen = []

    def run(batch):
        seen.append(len(batch))
        return batch * 2.0

    async def go():
        batcher = Batcher(run, max_batch=8, max_delay_ms=0)
        rows = [np.full((1, 2), i, np.float32) for i in range(20)]
        rows.insert(7, np.full((3, 2), 100, np.float32))
        out = await asyncio.gather(*(batcher(r) for r in rows))
        batcher.close()
        return rows, out

    rows, out = asyncio.run(go())
    assert all(np.array_equal(o, r * 2.0) for o, r in zip(out, rows))
    assert max(seen) <= 8 and sum(seen) == 23 and len(seen) == 3


def test_runner_failure_reaches_every_waiting_request():
    from toolkit.core.errors import ToolkitError

    def run(batch):
        raise ToolkitError("the model failed")

    async def go():
        batcher = Batcher(run, max_batch=8)
        results = await asyncio.gather(*(batcher(np.zeros((1, 2), np.float32)) for _ in range(3)), return_exceptions=True)
        batcher.close()
        return results

    assert all(isinstance(r, ToolkitError) for r in asyncio.run(go()))


def test_each_model_is_warmed_up_before_the_service_is_ready(serving_export, monkeypatch):
    """One batch of min(max batch, WARMUP_BATCH) zeros runs through every served model when the
    service is made, before any request (ONNX Runtime's arena then does not grow under load)."""
    from toolkit.serve import oip

    calls = []
    real_runner = Catalog.runner

    def spying_runner(self, entry):
        run = real_runner(self, entry)

        def spy(x):
            calls.append((entry.key, x.shape, x.dtype, float(np.abs(x).max())))
            return run(x)
        return spy

    monkeypatch.setattr(Catalog, "runner", spying_runner)
    service = oip.Service(Catalog.from_dirs([serving_export]))
    try:
        assert service.models and len(calls) == len(service.models)
        for (key, shape, dtype, peak), model in zip(calls, service.models.values()):
            assert shape == (min(model.max_batch, oip.WARMUP_BATCH), *model.dims) and dtype == np.float32 and peak == 0.0
    finally:
        service.close()


def _images_body(files: list[bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)],
                                   "data": [base64.b64encode(f).decode() for f in files]}]}).encode()


def _largest_png() -> bytes:
    """A 4096x4096 page with one bar on it: the largest image one may send, ~20 KB as a PNG."""
    import io

    from PIL import Image, ImageDraw

    from toolkit.inference.preprocess import MAX_SIDE

    im = Image.new("L", (MAX_SIDE, MAX_SIDE), 255)
    ImageDraw.Draw(im).rectangle((1900, 1000, 2200, 3000), fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_is_bounded_per_request_and_per_server_and_a_digit_is_not_stalled(v2_server, serving_export, digits, monkeypatch):
    """The issue's stall: requests of many large images (small files, far under --max-upload) kept the
    decode threads busy for 80 s while a one-digit request waited. Now the pixels the headers declare
    are bounded per request (413) and in flight (429, at once), and a small request decodes in a lane
    of its own. The large requests' decoding is held here until the end (so nothing depends on how
    fast this machine decodes): the digit is answered meanwhile, and one more large request is refused."""
    import threading

    from toolkit.serve import oip

    running, url = v2_server
    fp32, _ = _names(serving_export)
    infer = f"{url}v2/models/{fp32}/infer"
    big = _largest_png()
    per_request = oip.MAX_REQUEST_PIXELS // (4096 * 4096)  # the heaviest allowed request
    assert per_request >= 1 and 2 * per_request * 4096 * 4096 <= oip.MAX_INFLIGHT_PIXELS < 3 * per_request * 4096 * 4096
    status, answer = _post(infer, _images_body([big] * (per_request + 1)))
    assert status == 413 and "megapixels" in answer["error"], answer

    release, real, held = threading.Event(), oip.images_to_tensor, []

    def slow_for_large(files, model):
        if oip.declared_pixels(files) > oip.SMALL_REQUEST_PIXELS:
            held.append(len(files))
            release.wait(120)
        return real(files, model)

    monkeypatch.setattr(oip, "images_to_tensor", slow_for_large)
    finished: list[int] = []
    threads = [threading.Thread(target=lambda: finished.append(_post(infer, _images_body([big] * per_request))[0])) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(600):  # both large requests admitted: one decoding (held), one waiting for the large lane
            if running.service.pixels.in_use == 2 * per_request * 4096 * 4096:
                break
            threading.Event().wait(0.05)
        assert running.service.pixels.in_use == 2 * per_request * 4096 * 4096 and held == [per_request]
        with urllib.request.urlopen(f"{url}v2/health/live", timeout=30) as live:  # the event loop is free
            assert live.status == 200
        status, result = _post(infer, _images_body([png_bytes(digits[0][0])]))
        assert status == 200 and np.argmax(result["outputs"][0]["data"]) == digits[1][0] and not finished
        third, answer = _post(infer, _images_body([big] * per_request))
        assert third == 429 and "retry" in answer["error"], (third, answer)
    finally:
        release.set()
        for t in threads:
            t.join(120)
    assert finished == [200, 200] and running.service.pixels.in_use == 0  # decoded for real once released; budget given back


def test_lying_containers_are_answered_from_their_headers_and_never_decoded(v2_server, serving_export, digits, monkeypatch):
    """#40: 60 ICOs (8 here) whose headers say 16x16 and which hold a 9000x9000 PNG each (79 KB apiece) held the
    server 47 s, /v2/health/live with it. Now a format whose header does not give what is decoded is
    refused from its header (400, one line) and nothing is decoded; a GIF whose first frame is larger
    than its screen is counted by its frame (413 over the request's bound), also without decoding."""
    from PIL import ImageFile

    from tests.inference.test_preprocess import _gif_with_small_screen, _lying_ico
    from toolkit.serve import oip

    running, url = v2_server
    fp32, _ = _names(serving_export)
    infer = f"{url}v2/models/{fp32}/infer"
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    status, answer = _post(infer, _images_body([_lying_ico(9000)] * 8))  # as many as the fixture's 1mb --max-upload takes
    assert status == 400 and "not an image in an accepted format" in answer["error"] and "\n" not in answer["error"], answer
    per_request = oip.MAX_REQUEST_PIXELS // (3000 * 3000) + 1
    status, answer = _post(infer, _images_body([_gif_with_small_screen(3000)] * per_request))
    assert status == 413 and "megapixels" in answer["error"], answer
    assert decoded == []
    with urllib.request.urlopen(f"{url}v2/health/live", timeout=30) as live:
        assert live.status == 200
    status, result = _post(infer, _images_body([png_bytes(digits[0][0])]))
    assert status == 200 and np.argmax(result["outputs"][0]["data"]) == digits[1][0]


def test_a_decode_that_outlasts_its_bound_is_a_503_and_its_budget_comes_back(serving_export):
    """No request waits for its decoding longer than the service's bound: 503, one line; the pixels it
    took are given back when the decoding really ends (the thread cannot be stopped), not before."""
    import threading

    from toolkit.serve import oip

    service = oip.Service(Catalog.from_dirs([serving_export]), decode_timeout_s=0.2)
    model = next(iter(service.models.values()))
    release = threading.Event()
    real = oip.images_to_tensor
    try:
        oip.images_to_tensor = lambda files, m: (release.wait(60), real(files, m))[1]
        big = _largest_png()

        async def run():
            with pytest.raises(oip.ProtocolError) as err:
                await service.decode([big], model)
            assert err.value.status == 503 and "longer than 0.2 s" in str(err.value)
            assert service.pixels.in_use == 4096 * 4096  # still decoding: still counted
            release.set()
            for _ in range(600):
                if not service.pixels.in_use:
                    break
                await asyncio.sleep(0.05)
            assert service.pixels.in_use == 0

        asyncio.run(run())
    finally:
        oip.images_to_tensor = real
        release.set()
        service.close()


def test_random_bodies_never_get_a_5xx_and_the_server_keeps_answering(v2_server, serving_export, digits):
    """A bounded random generator over the infer endpoint (seeded, 300 cases): random bytes, random
    JSON of random depth and types, and good requests with one field replaced by a random value.
    Every answer is a 2xx or a 4xx with {"error": one line}; a good request still works after each."""
    rng = np.random.default_rng(2026)
    running, url = v2_server
    fp32, _ = _names(serving_export)
    manifest = Manifest.load(serving_export)
    infer = f"{url}v2/models/{fp32}/infer"
    good = {"inputs": [{"name": manifest.input.name, "datatype": "FP32", "shape": [1, 1, 28, 28], "data": digits[2][0].ravel().tolist()}]}

    def value(depth: int = 0):
        choices = [lambda: None, lambda: True, lambda: int(rng.integers(-2**40, 2**40)), lambda: float(rng.normal() * 1e6),
                   lambda: "x" * int(rng.integers(0, 40)), lambda: "NaN",
                   lambda: [value(depth + 1) for _ in range(rng.integers(0, 4))],
                   lambda: {str(rng.integers(0, 5)): value(depth + 1) for _ in range(rng.integers(0, 4))},
                   lambda: {"name": "image", "datatype": "BYTES", "shape": [int(rng.integers(-2, 3))], "data": [value(depth + 1)]}]
        return choices[rng.integers(0, 9 if depth < 6 else 6)]()

    def mutated() -> dict:
        request = json.loads(json.dumps(good))
        field = ["name", "datatype", "shape", "data", "parameters"][rng.integers(0, 5)]
        request["inputs"][0][field] = value()
        if rng.random() < 0.3:
            request[["outputs", "parameters", "id"][rng.integers(0, 3)]] = value()
        return request

    for case in range(300):
        pick = case % 3
        body = (rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes() if pick == 0
                else json.dumps(value()).encode() if pick == 1 else json.dumps(mutated()).encode())
        status, answer = _post(infer, body)
        assert status < 500, (case, body[:200], status, answer)
        if status >= 400:
            assert set(answer) == {"error"} and "\n" not in answer["error"], (case, answer)
        if case % 25 == 0:
            ok, result = _post(infer, json.dumps(good).encode())
            assert ok == 200 and np.argmax(result["outputs"][0]["data"]) == digits[1][0], f"after case {case}"
