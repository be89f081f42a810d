"""`toolkit serve --api-only --workers N`: N server processes on one port, each with its own model
sessions and batchers. The first process (the one the user started) listens with SO_REUSEPORT and starts
N-1 more of itself, which bind the same HTTP and gRPC ports; the kernel spreads new connections over
them. Each worker says its lines prefixed "worker i/N:", stops when the first process stops (SIGTERM
forwarded) and stops by itself if the first process is gone (killed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from toolkit.core.errors import ToolkitError

WORKER_ENV = "TOOLKIT_SERVE_WORKER"  # "i/N" in a worker started by the first process
PARENT_ENV = "TOOLKIT_SERVE_PARENT"  # the first process's pid
STARTUP_S = 180


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def parent_gone() -> bool:
    """True in a worker whose first process has ended (a worker never outlives it)."""
    parent = os.environ.get(PARENT_ENV)
    return bool(parent) and os.getppid() != int(parent)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other processes of this user may bind too."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ToolkitError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def start_workers(count: int, export_dirs: list[Path], *, host: str, port: int, grpc_port: int, max_upload: str,
                  batch_delay_ms: float, say) -> callable:
    """Start ``count`` more server processes on the same ports; wait until each is ready. Returns the
    function that stops them (SIGTERM, then SIGKILL after 10 s)."""
    argv = [sys.executable, "-m", "toolkit", "serve", *map(str, export_dirs), "--api-only", "--host", host, "--port", str(port),
            "--grpc-port", str(grpc_port), "--max-upload", max_upload, "--batch-delay-ms", str(batch_delay_ms), "--examples", "0"]
    procs: list[subprocess.Popen] = []

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    try:
        for i in range(count):
            name = f"worker {i + 2}/{count + 1}"
            env = {**os.environ, WORKER_ENV: name, PARENT_ENV: str(os.getpid())}
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            _wait_ready(proc, name, say)
    except BaseException:
        stop()
        raise
    return stop


def _wait_ready(proc: subprocess.Popen, name: str, say) -> None:
    """Relay the worker's lines (prefixed with its name) until it says ready, then on a thread."""
    deadline = time.monotonic() + STARTUP_S
    for line in proc.stdout:
        if not line.startswith(("serving ", "v2 API", "web page:")):  # what the first process has said already
            say(f"{name}: {line.rstrip()}")
        if line.startswith("ready:"):
            threading.Thread(target=lambda: [say(f"{name}: {rest.rstrip()}") for rest in proc.stdout], daemon=True).start()
            return
        if time.monotonic() > deadline:
            break
    raise ToolkitError(f"{name} did not start (exit {proc.poll()}): see its lines above")
