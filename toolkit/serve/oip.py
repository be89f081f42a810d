"""The Open Inference Protocol (KServe v2) over HTTP, for programs: what `toolkit serve` answers
under ``/v2`` beside the demo (or alone with ``--api-only``).

The same models as the export's Triton repository, under the same names (``<recipe>_<precision>``),
so that ``tritonclient.http`` with its defaults works against `toolkit serve` as it works against
Triton serving ``exports/<run>/triton``: health, server and model metadata, model config, the
repository index, and ``infer`` with JSON or binary tensors (the binary-data extension) and the
classification extension (``class_count`` in tritonclient). Beyond Triton, an input of datatype ``BYTES`` named
``image`` (or the model's input name) carries encoded image files (PNG, JPEG, ...; in JSON as
base64 strings), decoded by the deployed preprocessing (``toolkit.inference.preprocess``) exactly as
`toolkit predict` and the demo decode them.

Requests that arrive together are run as one batch (``Batcher``): while one batch runs, the
next requests wait in a queue and go in the next batch, up to the model's max batch; under load
a batch also waits up to ``max_delay_ms`` for more. Answers stay matched to their requests.

Errors are ``{"error": "..."}`` with a 4xx status; bodies are bounded; a model name is looked
up in a table and never reaches the file system.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from toolkit import __version__
from toolkit.inference.catalog import Catalog, Entry
from toolkit.core.errors import ToolkitError, first_line, shown
from toolkit.core.manifest import MAX_BATCH, triton_model_name
from toolkit.inference.preprocess import MAX_SIDE, decoded_pixels, model_pixels, to_input

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"  # the BYTES input: encoded image files
DEFAULT_MAX_BODY = 16 * 2**20
_NUMPY = {"FP32": np.float32, "UINT8": np.uint8}
_DATATYPE = {"float32": "FP32", "uint8": "UINT8"}
_TRITON_TYPE = {"FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8"}
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository"]
# Decoding work is bounded by the pixels the images declare in their headers (read before decoding):
# per request, and for all large requests being decoded at once; a request of small images decodes in
# a lane of its own, so a few requests of the largest images cannot stall a digit behind them.
MAX_REQUEST_PIXELS = 2 * MAX_SIDE**2  # two images of the largest size one may have
MAX_INFLIGHT_PIXELS = 4 * MAX_SIDE**2  # being decoded together, server-wide (~64 Mpx: a few hundred MB at most)
DECODE_TIMEOUT_S = 30.0  # the longest a request waits for its images to be decoded (503 then)
SMALL_REQUEST_PIXELS = 2**20  # a request of up to a megapixel in all (a photo, a batch of digits) takes the small lane


class ProtocolError(Exception):
    """A request the protocol refuses: ``status`` and the one-line message of ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Model:
    """One served artifact as the protocol shows it."""

    name: str
    entry: Entry
    max_batch: int
    input_name: str
    datatype: str  # the tensor input's: FP32, or UINT8 for `export --input uint8`
    dims: list[int]  # the input's shape without the batch axis, in the export's layout
    output_name: str
    classes: list[str]

    @property
    def platform(self) -> str:
        return "tensorrt_plan" if self.entry.artifact.format == "trt" else "onnxruntime_onnx"

    def metadata(self) -> dict:
        return {"name": self.name, "versions": ["1"], "platform": self.platform,
                "inputs": [{"name": self.input_name, "datatype": self.datatype, "shape": [-1, *self.dims]}],
                "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, len(self.classes)]}]}

    def config(self) -> dict:
        """Triton's model configuration in its JSON form (what ``get_model_config`` returns)."""
        return {"name": self.name, "platform": self.platform, "backend": "onnxruntime" if self.platform == "onnxruntime_onnx" else "tensorrt",
                "max_batch_size": self.max_batch,
                "input": [{"name": self.input_name, "data_type": _TRITON_TYPE[self.datatype], "dims": [str(d) for d in self.dims]}],
                "output": [{"name": self.output_name, "data_type": "TYPE_FP32", "dims": [str(len(self.classes))], "label_filename": "labels.txt"}],
                "dynamic_batching": {}, "parameters": {"toolkit_artifact": {"string_value": self.entry.key}}}


def protocol_models(catalog: Catalog) -> tuple[dict[str, Model], list[str]]:
    """name -> Model for every entry of the catalog, and a line for each one left off (a name
    another export already took: serve one export per recipe to reach both)."""
    models: dict[str, Model] = {}
    left: list[str] = []
    for entry in catalog.entries.values():
        manifest, art = entry.manifest, entry.artifact
        if entry.runtime == "pytorch":
            continue
        name = triton_model_name(manifest.source.recipe, art, manifest.input)
        if name in models:
            left.append(f"{entry.key}: not on the v2 API, its name {name} is {models[name].entry.key}'s (newest first)")
            continue
        recorded = manifest.triton.models.get(name) if manifest.triton else None
        max_batch = art.get("max_batch") or (recorded and (recorded.model_extra or {}).get("max_batch_size"))
        models[name] = Model(name, entry, int(max_batch or MAX_BATCH), manifest.input.name,
                             _DATATYPE[manifest.input.dtype], list(manifest.input.shape[1:]), manifest.output.name, list(manifest.classes))
    return models, left


class Batcher:
    """Runs one model's requests in batches on one worker thread; ``await batcher(x)`` gives x's rows
    of the output. A batch takes every request waiting when the previous one ends (up to
    ``max_batch`` rows); after a batch of more than one request (the server is busy) it also
    waits up to ``max_delay_ms`` for more."""

    def __init__(self, run, max_batch: int, max_delay_ms: float = 1.0):
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay_ms / 1e3
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="toolkit-batch")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # counters, for tests and load reports
        self.requests = 0

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.queue is None:  # made in the first server's event loop, on first use
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._work())
        if loop is not self.loop:  # another server's loop (gRPC beside HTTP): handed over, so both share one batch
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self(x), self.loop))
        done = loop.create_future()
        self.queue.put_nowait((x, done))
        return await done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        busy = False
        while True:
            first = carry or await self.queue.get()
            carry = None
            items, rows = [first], len(first[0])
            deadline = loop.time() + (self.max_delay if busy else 0.0)
            while rows < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                if rows + len(item[0]) > self.max_batch:
                    carry = item
                    break
                items.append(item)
                rows += len(item[0])
            busy = len(items) > 1
            items = [(x, done) for x, done in items if not done.cancelled()]  # a client that went away
            if not items:
                continue
            try:
                out = await loop.run_in_executor(self.pool, self.run, np.concatenate([x for x, _ in items]))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the runner's error
                for _, done in items:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.batches += 1
            self.requests += len(items)
            start = 0
            for x, done in items:
                if not done.done():
                    done.set_result(out[start:start + len(x)])
                start += len(x)

    def close(self) -> None:
        """Stop the worker task in its own loop and wait for it there (a task left pending is destroyed later, at
        some garbage collection, with an error); a loop that has ended took its tasks with it."""
        task, loop = self.task, self.loop
        if task is not None and loop is not None and loop.is_running():
            if loop is asyncio._get_running_loop():
                task.cancel()
            else:
                async def stop() -> None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the wire format

def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The request's JSON header and the binary data after it (the binary-data extension)."""
    try:
        size = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} {shown(header_length)} is not a number") from None
    if not 0 <= size <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {size} is outside the body's {len(body)} bytes")
    try:
        request = json.loads(body[:size])
    except RecursionError:  # '[' * 100000: Python's parser gives up on the depth, not the syntax
        raise ProtocolError("the request header is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError of a body that is not text
        raise ProtocolError(f"the request header is not JSON ({first_line(exc)})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request header must be a JSON object")
    return request, body[size:]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor data in binary form: each element as a 4-byte little-endian length and its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError("BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise ProtocolError("BYTES data is shorter than an element's length says")
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return out


def _serialize_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input {shown(tensor.get('name'))}: shape must be a list of whole numbers")
    return shape


def _image_files(tensor: dict, shape: list[int], size: int | None, blob: bytes, model: Model) -> list[bytes]:
    """The encoded image files of a BYTES input: binary elements after the JSON header, or base64 strings in it."""
    name, count = tensor.get("name"), int(np.prod(shape))
    if name not in (IMAGE_INPUT, model.input_name):
        raise ProtocolError(f"unknown input {shown(name)}: {model.name} takes {model.input_name} or {IMAGE_INPUT}")
    if size is not None:
        files = _bytes_elements(blob)
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise ProtocolError(f"input {shown(name)}: BYTES data in JSON is a list of base64 strings")
        try:
            files = [base64.b64decode(d, validate=True) for d in data]
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input {shown(name)}: an element is not base64") from None
    if len(files) != count or count == 0:
        raise ProtocolError(f"input {shown(name)}: shape {shape} says {count} images, the data has {len(files)}")
    if shape[0] > model.max_batch:
        raise ProtocolError(f"batch {shape[0]} is over {model.name}'s max batch size {model.max_batch}")
    return files


def read_inputs(request: dict, blob: bytes, model: Model) -> tuple[str, np.ndarray | list[bytes]]:
    """The request's one input: ("tensor", array of [N, *dims]) or ("images", [encoded file, ...])."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"give exactly one input: {model.input_name} ({model.datatype}, shape [N, "
                            f"{', '.join(map(str, model.dims))}]) or {IMAGE_INPUT} (BYTES, encoded image files)")
    tensor = inputs[0]
    name, datatype = tensor.get("name"), tensor.get("datatype")
    shape = _shape(tensor)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("parameters must be a JSON object")
    size = params.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0 or size != len(blob)):
        raise ProtocolError(f"binary_data_size {shown(size)} does not match the {len(blob)} bytes after the JSON header")
    if size is None and blob:
        raise ProtocolError("binary data follows the JSON header but no input has binary_data_size")
    if "shared_memory_region" in params:
        raise ProtocolError("shared memory is not supported here: send the data in the request")
    if datatype == "BYTES":
        return "images", _image_files(tensor, shape, size, blob, model)
    if name != model.input_name:
        raise ProtocolError(f"unknown input {shown(name)}: {model.name} takes {model.input_name} or {IMAGE_INPUT}")
    if datatype != model.datatype:
        raise ProtocolError(f"input {name}: datatype {shown(datatype)}, expected {model.datatype}")
    if len(shape) != 1 + len(model.dims) or shape[1:] != model.dims or shape[0] < 1:
        raise ProtocolError(f"input {name}: shape {shape}, expected [N, {', '.join(map(str, model.dims))}]")
    if shape[0] > model.max_batch:
        raise ProtocolError(f"batch {shape[0]} is over {model.name}'s max batch size {model.max_batch}")
    dtype = _NUMPY[datatype]
    count = int(np.prod(shape))
    if size is not None:
        if size != count * np.dtype(dtype).itemsize:
            raise ProtocolError(f"input {name}: {size} bytes for shape {shape} of {datatype}")
        array = np.frombuffer(blob, dtype=dtype).reshape(shape)
    else:
        try:
            array = np.asarray(tensor.get("data"), dtype=np.float64)
        except (TypeError, ValueError):
            raise ProtocolError(f"input {name}: data must be numbers") from None
        if array.size != count:
            raise ProtocolError(f"input {name}: shape {shape} has {count} elements, the data {array.size}")
        if not np.isfinite(array).all() or (dtype is np.uint8 and ((array < 0) | (array > 255) | (array != np.round(array))).any()):
            raise ProtocolError(f"input {name}: values must be finite{' whole numbers from 0 to 255' if dtype is np.uint8 else ''}")
        array = array.astype(dtype).reshape(shape)
    if dtype is np.float32 and not np.isfinite(array).all():
        raise ProtocolError(f"input {name}: values must be finite (NaN or infinity found)")
    return "tensor", array


def declared_pixels(files: list[bytes]) -> int:
    """The pixels decoding these encoded images would produce, from their headers alone (nothing is
    decoded: ``preprocess.decoded_pixels``). A file that would be refused counts nothing."""
    return sum(decoded_pixels(f) for f in files)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library): looked up once (find_library runs ldconfig)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_memory() -> None:
    """Give the memory of large decodes back: Pillow's block cache, then the C allocator's free pages.
    Without it a server kept ~60 MiB after a few bursts of the largest images (docs: README, Safety)."""
    from PIL import Image

    Image.core.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class PixelBudget:
    """Decoded pixels in flight, server-wide (HTTP and gRPC, each on its own event loop's thread)."""

    limit: int = MAX_INFLIGHT_PIXELS
    in_use: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, pixels: int) -> bool:
        with self.lock:
            if self.in_use and self.in_use + pixels > self.limit:
                return False
            self.in_use += pixels
            return True

    def give(self, pixels: int) -> None:
        with self.lock:
            self.in_use -= pixels


def images_to_tensor(files: list[bytes], model: Model) -> np.ndarray:
    """Encoded image files -> the model's input batch, by the deployed preprocessing."""
    manifest = model.entry.manifest
    try:
        return np.concatenate([to_input(model_pixels(bytes(f), manifest), manifest) for f in files])
    except ToolkitError as exc:
        raise ProtocolError(str(exc)) from None


@dataclass
class Requested:
    name: str
    binary: bool
    class_count: int = 0


def requested_outputs(request: dict, model: Model) -> list[Requested]:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("parameters must be a JSON object")
    outputs = request.get("outputs")
    if outputs is None:
        return [Requested(model.output_name, bool(params.get("binary_data_output", False)))]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("outputs must be a list of objects")
    wanted = []
    for out in outputs:
        if out.get("name") != model.output_name:
            raise ProtocolError(f"unknown output {shown(out.get('name'))}: {model.name} has {model.output_name}")
        p = out.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError("parameters must be a JSON object")
        if "shared_memory_region" in p:
            raise ProtocolError("shared memory is not supported here: take the output in the response")
        k = p.get("classification", 0)
        if type(k) is not int or k < 0:
            raise ProtocolError(f"classification {shown(k)} must be a whole number")
        wanted.append(Requested(model.output_name, bool(p.get("binary_data", params.get("binary_data_output", False))), min(k, len(model.classes))))
    return wanted


def response_body(model: Model, request: dict, logits: np.ndarray, wanted: list[Requested]) -> tuple[bytes, dict]:
    """The infer response: JSON, or JSON followed by binary outputs with its length in a header."""
    outputs, blobs = [], []
    for out in wanted:
        if out.class_count:  # the classification extension: "score:index:label" per row, best first
            order = np.argsort(-logits, axis=1, kind="stable")[:, :out.class_count]
            values = [f"{logits[r, i]:f}:{i}:{model.classes[i]}".encode() for r in range(len(logits)) for i in order[r]]
            tensor = {"name": out.name, "datatype": "BYTES", "shape": [len(logits), out.class_count]}
            if out.binary:
                blob = _serialize_bytes(values)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = [v.decode() for v in values]
        else:
            data = np.ascontiguousarray(logits, dtype=np.float32)
            tensor = {"name": out.name, "datatype": "FP32", "shape": list(data.shape)}
            if out.binary:
                tensor["parameters"] = {"binary_data_size": data.nbytes}
                blobs.append(data.tobytes())
            else:
                tensor["data"] = data.ravel().tolist()
        outputs.append(tensor)
    answer = {"model_name": model.name, "model_version": "1", "outputs": outputs}
    if isinstance(request.get("id"), str):
        answer["id"] = request["id"]
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


# ----------------------------------------------------------------------------- the HTTP application

WARMUP_BATCH = 64  # twice the 32 concurrent clients the serving targets were measured with


@dataclass
class Service:
    """The protocol's state: the models, their batchers, the body limit."""

    catalog: Catalog
    max_body: int = DEFAULT_MAX_BODY
    max_delay_ms: float = 1.0
    models: dict[str, Model] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    max_request_pixels: int = MAX_REQUEST_PIXELS
    pixels: PixelBudget = field(default_factory=PixelBudget)
    decode_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="toolkit-decode"))
    small_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="toolkit-decode-small"))
    probe_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="toolkit-probe"))
    decode_timeout_s: float = DECODE_TIMEOUT_S

    def __post_init__(self):
        self.models, self.left_out = protocol_models(self.catalog)
        for name, model in list(self.models.items()):  # loaded and warmed up now: ready means ready
            try:
                run = self.catalog.runner(model.entry)
            except ToolkitError as exc:  # e.g. a graph whose outputs are not one score per class: left out, said why
                del self.models[name]
                self.catalog.entries.pop(model.entry.key, None)  # nor in the demo
                self.left_out.append(f"{model.entry.key}: {exc}")
                continue
            # one batch first, as Triton's model warm-up does: ONNX Runtime's memory arena grows to what
            # concurrent load needs before the first request rather than during it (memory stays flat
            # under load); WARMUP_BATCH, not the max batch, so a large --max-batch costs no memory up front
            warm = min(model.max_batch, WARMUP_BATCH)
            run(np.zeros((warm, *model.dims), dtype=np.uint8 if model.datatype == "UINT8" else np.float32))
            self.batchers[name] = Batcher(run, model.max_batch, self.max_delay_ms)

    def model(self, name: str, version: str | None = None) -> Model:
        if name not in self.models:
            raise ProtocolError(f"unknown model {shown(name)}; served: {', '.join(self.models) or 'none'}", 404)
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name} has version 1 only, not {shown(version)}", 404)
        return self.models[name]

    async def infer(self, name: str, version: str | None, body: bytes, header_length: str | None) -> tuple[bytes, dict]:
        model = self.model(name, version)
        request, blob = split_body(body, header_length)
        logits, wanted = await self.logits(model, request, blob)
        return response_body(model, request, logits, wanted)

    async def logits(self, model: Model, request: dict, blob: bytes) -> tuple[np.ndarray, list[Requested]]:
        """One infer request (the protocol's JSON form and its binary data, from HTTP or gRPC): the model's
        logits for it, and the outputs it asked for."""
        kind, data = read_inputs(request, blob, model)
        wanted = requested_outputs(request, model)
        if kind == "images":
            data = await self.decode(data, model)
        try:
            logits = await self.batchers[model.name](data)
        except ToolkitError as exc:
            raise ProtocolError(str(exc), 500) from None
        return logits, wanted

    async def decode(self, files: list[bytes], model: Model) -> np.ndarray:
        """The images decoded within the pixel budget, off the event loop. Their pixels are counted from
        the headers first, in a thread of its own (the headers of the accepted formats give the size of
        what is decoded; other formats are refused unread). A request of up to a megapixel decodes in the
        small lane (one thread: a megapixel at a time, whatever waits holds only its encoded bytes).
        A larger one: over the per-request bound, 413; while the large lane's budget is spent on
        others, 429 at once (a client retries, nobody queues). No request waits for its decoding more
        than ``decode_timeout_s`` (503); the budget is given back when the decoding really ends."""
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self.probe_pool, declared_pixels, files)
        if pixels <= SMALL_REQUEST_PIXELS:  # the small lane: one thread, so at most a megapixel decoding at a time
            return await self._bounded(loop.run_in_executor(self.small_pool, images_to_tensor, files, model))
        if pixels > self.max_request_pixels:
            raise ProtocolError(f"the images hold {pixels / 1e6:.1f} megapixels; at most {self.max_request_pixels / 1e6:.1f} in one request", 413)
        if not self.pixels.take(pixels):
            raise ProtocolError(f"the server is decoding {self.pixels.in_use / 1e6:.1f} megapixels for other requests; retry in a moment", 429)
        work = loop.run_in_executor(self.decode_pool, images_to_tensor, files, model)
        work.add_done_callback(lambda _: self._decoded(pixels))
        return await self._bounded(work)

    async def _bounded(self, work: "asyncio.Future") -> np.ndarray:
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.decode_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"decoding the images took longer than {self.decode_timeout_s:g} s; send smaller images", 503) from None

    def _decoded(self, pixels: int) -> None:
        """A large decode ended (on the event loop's thread): its pixels go back to the budget, and after
        the last one its memory goes back to the system."""
        self.pixels.give(pixels)
        if not self.pixels.in_use:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: the server is stopping
                self.decode_pool.submit(release_memory)

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.small_pool.shutdown(wait=False, cancel_futures=True)
        self.probe_pool.shutdown(wait=False, cancel_futures=True)


def routes(service: Service) -> list:
    """The routes to put first in a web application (Starlette, FastAPI, Gradio's): ``/v2`` and
    everything under it, answered by ``service``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > service.max_body):
            raise ProtocolError(f"the request body is over the limit of {service.max_body} bytes", 413)
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > service.max_body:
                    raise ProtocolError(f"the request body is over the limit of {service.max_body} bytes", 413)
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing to log
            raise ProtocolError("the client disconnected before the body was sent", 400) from None
        return b"".join(chunks)

    async def server_metadata(request):
        return JSONResponse({"name": "toolkit", "version": __version__, "extensions": EXTENSIONS})

    async def live(request):
        return Response(status_code=200)

    async def ready(request):
        return Response(status_code=200 if service.models else 503)

    async def models(request):
        return JSONResponse({"models": list(service.models)})

    async def index(request):
        await read_body(request)
        return JSONResponse([{"name": n, "version": "1", "state": "READY"} for n in service.models])

    async def model_metadata(request):
        return JSONResponse(service.model(request.path_params["name"], request.path_params.get("version")).metadata())

    async def model_ready(request):
        service.model(request.path_params["name"], request.path_params.get("version"))
        return Response(status_code=200)

    async def model_config(request):
        return JSONResponse(service.model(request.path_params["name"], request.path_params.get("version")).config())

    async def infer(request):
        body = await read_body(request)
        content, headers = await service.infer(request.path_params["name"], request.path_params.get("version"),
                                               body, request.headers.get(HEADER_LENGTH))
        return Response(content, headers=headers)

    async def protocol_error(request, exc: ProtocolError):
        return error(str(exc), exc.status)

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            return error(f"no such v2 endpoint: {shown(request.url.path)}", 404)
        if exc.status_code == 405:
            return error(f"{request.method} is not allowed on {shown(request.url.path)}", 405)
        return error(exc.detail if isinstance(exc.detail, str) else "bad request", exc.status_code)

    paths = [Route("/", server_metadata), Route("/health/live", live), Route("/health/ready", ready),
              Route("/models", models), Route("/repository/index", index, methods=["POST"])]
    for base in ("/models/{name}", "/models/{name}/versions/{version}"):
        paths += [Route(base, model_metadata), Route(base + "/ready", model_ready), Route(base + "/config", model_config),
                   Route(base + "/infer", infer, methods=["POST"])]
    v2 = Starlette(routes=paths, exception_handlers={ProtocolError: protocol_error, HTTPException: http_error})
    return [Route("/v2", server_metadata), Mount("/v2", app=v2)]  # GET /v2 itself: no redirect to /v2/
