"""`toolkit serve`: the exported models behind the Gradio demo and its HTTP API, and the Open
Inference Protocol (KServe v2, ``toolkit.serve.oip``) under ``/v2`` on the same port (or alone with
``api_only``: no Gradio needed), without torch.

Everything here runs on the serving install (ONNX Runtime, NumPy, Pillow, Gradio): what to
serve comes from the exports' ``manifest.json`` through ``toolkit.inference.catalog``, which classifies an
image exactly as `toolkit predict` does (``toolkit.inference.preprocess`` decodes it defensively and
prepares it as the model's training data was). This module starts and stops the server; the
Gradio layout itself lives in ``toolkit/serve/demo.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.inference.catalog import MNIST_FAMILY, Catalog
from toolkit.serve import workers
from toolkit.core.errors import Interrupted, ToolkitError, first_line, shown
from toolkit.core.files import resolve_data_dir
from toolkit.core.manifest import Manifest
from toolkit.serve.oip import Service
from toolkit.inference.preprocess import as_image
from toolkit.inference.splits import read_test_split

MAX_UPLOAD = "10mb"  # Gradio refuses bigger uploads before they reach Python


# ----------------------------------------------------------------------------- examples

def mnist_test_digits(data_dir: Path, count: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``count`` random digits (28x28 uint8) of the real MNIST test set; [] when the files are not there."""
    split = read_test_split("mnist", data_dir)
    if split is None:
        return []
    images, labels, _ = split
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return [(as_image(images[i]), int(labels[i])) for i in pick]


def write_examples(digits: list[tuple[np.ndarray, int]], folder: Path) -> list[str]:
    from PIL import Image

    paths = []
    for i, (pixels, label) in enumerate(digits):
        path = folder / f"mnist-test-{i:02d}-label{label}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- server

def check_listen_address(host: str, port: int) -> None:
    """One line now, instead of a traceback from the web server later: the host must be an address
    of this machine (or a name for one) and the port free."""
    import ipaddress
    import socket

    if re.fullmatch(r"[0-9.]+", host):  # looks like IPv4: never send it to DNS
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ToolkitError(f"--host {shown(host)} is not an IPv4 address") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ToolkitError(f"--host {shown(host)}: no such address or host name") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ToolkitError(f"port {port} on {host} is in use by another program: choose another with --port") from None
            raise ToolkitError(f"cannot listen on {host}:{port}: {exc.strerror or first_line(exc)}") from None


def parse_size(text: str) -> str:
    """``--max-upload``: a size such as 10mb, 500kb or 1gb (what Gradio takes), else one line."""
    if not re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*(b|kb|mb|gb)?\s*", str(text), re.IGNORECASE) or float(re.sub(r"[^0-9.]", "", text)) <= 0:
        raise ToolkitError(f"--max-upload {shown(text)}: give a size such as 10mb, 500kb or 1gb")
    return text.strip().lower()


def size_bytes(size: str) -> int:
    """A size parse_size accepted, in bytes (1kb = 1000 bytes, as Gradio counts)."""
    number, unit = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", size).groups()
    return int(float(number) * {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}[unit])


@dataclass
class Running:
    """A started server: the demo (None with ``api_only``), the v2 API's state, and how to stop both."""

    url: str
    service: Service
    demo: object | None = None
    api_server: object | None = None  # uvicorn's Server with ``api_only``
    api_thread: threading.Thread | None = None
    grpc: object | None = None  # grpc_v2.GrpcServer, with a gRPC port
    cleanup: list = field(default_factory=list)

    def close(self) -> None:
        if self.grpc is not None:  # first: its calls under way finish (new ones get UNAVAILABLE) while the batchers run
            self.grpc.close()
        if self.demo is not None:
            self.demo.close()
        if self.api_server is not None:
            self.api_server.should_exit = True
            self.api_thread.join(timeout=10)
        self.service.close()
        if self.grpc is not None:
            self.grpc.end()
        for undo in self.cleanup:
            undo()


def _start_api_only(app, host: str, port: int, reuse_port: bool = False) -> tuple[object, threading.Thread]:
    """The v2 API alone under uvicorn, on a thread (the main thread waits for signals); ``reuse_port``: on a
    socket that the other server processes of ``--workers`` bind too."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # signals go to the CLI's handlers (older uvicorn calls this)
    sockets = [workers.reuse_port_socket(host, port)] if reuse_port else None
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="toolkit-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ToolkitError(f"cannot listen on {host}:{port}: the API server did not start")
        time.sleep(0.01)
    return server, thread


def _grpc_port(grpc_port: int, host: str, port: int, say) -> int:
    """The gRPC port to listen on, checked (0: none; also when the gRPC packages are not installed, said).
    A ``--workers`` worker binds its first process's ports: they are in use, by design."""
    if grpc_port and not _grpc_installed():
        say("v2 API over gRPC: off, grpcio and tritonclient[grpc] are not installed (pip install '.[api]' in the toolkit's repository)")
        return 0
    if grpc_port and not workers.is_worker():
        if grpc_port == port:
            raise ToolkitError(f"--grpc-port {grpc_port} is --port's too: give gRPC a port of its own")
        check_listen_address(host, grpc_port)
    return grpc_port


def _say_served(say, catalog: Catalog, service, local: str, api_only: bool, grpc_address: str | None, page_paths: list[str]) -> None:
    """One line per served artifact, v2 model, gRPC address and web page."""
    if not api_only:
        for key in catalog.keys():
            say(f"serving {catalog.entries[key].label}")
    for name, model in service.models.items():
        say(f"v2 API: {local}v2/models/{name} ({model.entry.key})")
    if grpc_address:
        say(f"v2 API over gRPC: {grpc_address} (tritonclient.grpc, KServe's GRPCInferenceService)")
    for path in page_paths:
        say(f"web page: {local}{path.lstrip('/')} (static files: the browser runs the model)")


def _service(catalog: Catalog, max_upload: str, batch_delay_ms: float, say) -> Service:
    """The v2 service over the catalog, after saying what is not served and why."""
    for line in catalog.skipped:
        say(f"not served: {line}")
    for line in catalog.notices + catalog.warnings:
        say(line)
    service = Service(catalog, max_body=size_bytes(max_upload), max_delay_ms=batch_delay_ms)
    for line in service.left_out:
        say(line)
    if not catalog.entries:
        raise ToolkitError(f"nothing to serve: {'; '.join(service.left_out)}")
    return service


def _start_grpc(running: Running, host: str, grpc_port: int, reuse_port: bool) -> None:
    from toolkit.serve.grpc_v2 import GrpcServer

    try:
        running.grpc = GrpcServer(running.service, host, grpc_port, reuse_port=reuse_port)
    except ToolkitError:
        running.close()
        raise


def serve(export_dirs: list[Path], host: str = "127.0.0.1", port: int = 7860, data_dir: Path | None = None,
          top_k: int = 3, examples: int = 8, share: bool = False, max_upload: str = MAX_UPLOAD,
          api_only: bool = False, batch_delay_ms: float = 1.0, grpc_port: int = 0, block: bool = True, console=None,
          workers_count: int = 1):
    """Start the demo with the v2 API under /v2 (or the v2 API alone with ``api_only``, in ``workers_count``
    processes), and the v2 API over gRPC on ``grpc_port`` (0: none); returns ``(Running, url)`` when ``block``
    is False (tests), else serves until SIGINT or SIGTERM (``docker stop``), then closes the server and returns."""
    max_upload = parse_size(max_upload)
    say = console.print if console is not None else print
    args = (export_dirs, host, port, data_dir, top_k, examples, share, max_upload, api_only, batch_delay_ms, grpc_port, workers_count, say)
    if not block:  # tests: started and handed back, no signals handled
        running = _start(*args)[0]
        return running, running.url
    running = None
    try:  # from start-up on: a server may answer before it has ended, and a SIGTERM then still stops it cleanly (exit 0)
        with _signals_held() as held:
            running, grpc_port, share_url, page_paths = _start(*args)
        if held:
            raise Interrupted(held[0])
        local = running.url
        _say_served(say, running.service.catalog, running.service, local, api_only, f"{host}:{grpc_port}" if grpc_port else None, page_paths)
        if workers_count > 1:
            running.cleanup.append(workers.start_workers(workers_count - 1, export_dirs, host=host, port=port, grpc_port=grpc_port,
                                                         max_upload=max_upload, batch_delay_ms=batch_delay_ms, say=say))
        say(f"ready: {local}" + (" (v2 API only)" if api_only else "")
            + (f" (listening on {host}; other machines use this machine's address)" if host in ("0.0.0.0", "::") else "")
            + (f", public link {share_url}" if share_url else ""))
        while not workers.parent_gone():  # the CLI's signal handlers raise Interrupted here on SIGINT / SIGTERM
            time.sleep(0.2)
    except (Interrupted, KeyboardInterrupt) as stop:
        signame = signal.Signals(stop.signum).name if isinstance(stop, Interrupted) else "SIGINT"
        say(f"{signame}: stopping the server")
    finally:
        if running is not None:
            running.close()
    say("stopped")
    return running, running.url


def _start(export_dirs, host, port, data_dir, top_k, examples, share, max_upload, api_only, batch_delay_ms, grpc_port, workers_count, say):
    """The servers of ``serve``, started: (Running, the gRPC port or 0, Gradio's share link or None, the web pages' paths)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network
    from toolkit.serve.oip import routes

    catalog = Catalog.from_dirs(export_dirs)
    catalog.serving = True
    if workers_count > 1 and not api_only:
        raise ToolkitError("--workers needs --api-only: the Gradio demo runs in one process")
    reuse_port = workers_count > 1 or workers.is_worker()
    if not workers.is_worker():
        check_listen_address(host, port)
    grpc_port = _grpc_port(grpc_port, host, port, say)
    service = _service(catalog, max_upload, batch_delay_ms, say)
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    share_url = None
    pages, page_paths = web_routes(catalog)
    if api_only:
        if share:
            raise ToolkitError("--share makes a public link to the Gradio demo; --api-only serves no demo")
        server, thread = _start_api_only(_api_alone(routes(service) + pages), host, port, reuse_port)
        running = Running(local, service, api_server=server, api_thread=thread)
    else:
        running = _start_demo(catalog, service, routes(service) + pages, host, port, data_dir, top_k, examples, share, max_upload, say)
        share_url = running.demo.share_url
    if grpc_port:
        _start_grpc(running, host, grpc_port, reuse_port)
    return running, grpc_port, share_url, page_paths


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held while the servers start (recorded, not raised inside a server's start-up
    code), then the previous handlers back; yields the list of held signal numbers. A client may get an
    answer before start-up has ended, and its SIGTERM must still stop the server cleanly (exit 0). In a
    thread other than the main one (tests) nothing is held: only the main thread can set handlers."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda number, _frame: held.append(number))
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)


ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}  # 2 wasm threads


def web_routes(catalog: Catalog) -> tuple[list, list[str]]:
    """The served exports' web pages (`toolkit export --format web`) as static files: /web/<export>/<folder>/
    for each, and /web/ for the first served export's fp32 page; sent cross-origin isolated, so that the page
    may run ONNX Runtime Web on two threads. Returns the routes and their paths."""
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    def isolated(app):
        async def with_headers(scope, receive, send):
            async def send_isolated(message):
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] = list(message["headers"]) + [(k.lower().encode(), v.encode()) for k, v in ISOLATION.items()]
                await send(message)
            await app(scope, receive, send_isolated)
        return with_headers

    routes, paths, seen = [], [], set()
    for entry in catalog.entries.values():
        if entry.export_dir in seen:
            continue
        seen.add(entry.export_dir)
        for art in entry.manifest.artifacts:
            if art.format == "web":
                path = f"/web/{entry.manifest.name}/{art.file}"
                routes.append(Mount(path, app=isolated(StaticFiles(directory=Manifest.path(entry.export_dir, art), html=True))))
                paths.append(path + "/")
    fp32 = next((r for r in routes if not r.path.endswith("-int8")), None)
    if fp32 is not None:
        routes.append(Mount("/web", app=fp32.app))
        paths.insert(0, "/web/")
    return routes, paths


def _grpc_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "tritonclient")) and \
        importlib.util.find_spec("tritonclient.grpc") is not None


def _api_alone(v2_routes: list):
    """The v2 API with nothing else: other paths are protocol-shaped 404s too."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse

    async def not_found(request, exc):
        return JSONResponse({"error": "no such path: this server answers the v2 API under /v2 only"}, status_code=404)

    return Starlette(routes=v2_routes, exception_handlers={404: not_found})


def _start_demo(catalog, service, v2_routes, host, port, data_dir, top_k, examples, share, max_upload, say) -> Running:
    from toolkit.serve.demo import CSS, build_demo

    recorded = next((e.manifest.source.data_dir for e in catalog.entries.values() if e.manifest.source.data_dir), None)
    root = resolve_data_dir(data_dir, recorded)
    example_paths: list[str] = []
    allowed: list[str] = []
    example_dir = None
    if examples > 0 and catalog.keys(MNIST_FAMILY):
        digits = mnist_test_digits(root, examples)
        if digits:
            example_dir = Path(tempfile.mkdtemp(prefix="toolkit-examples-"))
            example_paths, allowed = write_examples(digits, example_dir), [str(example_dir)]
        else:
            say(f"no MNIST test set under {root}: the MNIST tab has no examples (set --data-dir or TOOLKIT_DATA_DIR)")
    demo = build_demo(catalog, example_paths, top_k=top_k)
    demo.queue(default_concurrency_limit=4)
    try:
        # the v2 API's routes come first in the demo's own web application, on the same port
        demo.launch(
            server_name=host, server_port=port, share=share, max_file_size=size_bytes(max_upload), show_error=True,
            allowed_paths=allowed, ssr_mode=False, quiet=True, prevent_thread_lock=True, css=CSS,
            app_kwargs={"routes": v2_routes},
        )
    except OSError as exc:  # the port was taken between the check and the bind
        service.close()
        raise ToolkitError(f"cannot listen on {host}:{port}: {first_line(exc)}") from None
    running = Running(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/", service, demo=demo)
    if example_dir is not None:
        running.cleanup.append(lambda: shutil.rmtree(example_dir, ignore_errors=True))
    return running
