"""Load on `toolkit serve`, measured as clients see it: N concurrent clients for a bounded time on
loopback, each sending real MNIST test digits one request after another.

    python bench/serve_load.py exports/<run> --clients 32 --seconds 60              # v2 API, tritonclient
    python bench/serve_load.py exports/<run> --clients 8 --seconds 30 --via gradio  # the demo's /predict

Starts `toolkit serve` (``--api-only`` for the v2 API) in a separate process on a free localhost
port, waits until it is ready, runs the clients, stops the server, and prints requests, errors,
correct answers, answers equal to the model run in this process, p50/p99 latency, requests/s
and the server's resident memory before and after. It stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from toolkit.inference.catalog import Catalog
from toolkit.core.environment import cpu_line
from toolkit.core.files import resolve_data_dir
from toolkit.core.manifest import triton_model_name
from toolkit.inference.preprocess import model_input, png_bytes
from toolkit.inference.splits import read_test_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(export_dir: Path, port: int, api_only: bool, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "toolkit", "serve", str(export_dir), "--port", str(port), "--examples", "0"]
    if api_only:
        cmd.append("--api-only")
    if threads:
        cmd += ["--threads", str(threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"toolkit serve exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("toolkit serve did not become ready within 120 s")


async def v2_clients(port: int, model: str, input_name: str, output_name: str, inputs: np.ndarray, clients: int, seconds: float):
    import tritonclient.http.aio as aio

    latencies: list[float] = []
    answers: list[tuple[int, np.ndarray]] = []  # (image index, logits)
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def one(worker: int):
        client = aio.InferenceServerClient(f"127.0.0.1:{port}")
        i = worker
        try:
            while time.perf_counter() < stop:
                k = i % len(inputs)
                x = aio.InferInput(input_name, [1, *inputs.shape[1:]], "FP32" if inputs.dtype == np.float32 else "UINT8")
                x.set_data_from_numpy(inputs[k:k + 1])
                t0 = time.perf_counter()
                try:
                    result = await client.infer(model, [x])
                    latencies.append(time.perf_counter() - t0)
                    answers.append((k, result.as_numpy(output_name)[0]))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(str(exc)[:200])
                i += clients
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(w) for w in range(clients)))
    return latencies, answers, errors, time.perf_counter() - t0


def gradio_clients(port: int, artifact: str, files: list[Path], clients: int, seconds: float):
    from gradio_client import Client, handle_file

    latencies, answers, errors = [], [], []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def one(worker: int):
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        i = worker
        while time.perf_counter() < stop:
            k = i % len(files)
            t0 = time.perf_counter()
            try:
                out = client.predict(handle_file(str(files[k])), artifact, api_name="/predict")
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    answers.append((k, out["label"]))
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(str(exc)[:200])
            i += clients

    t0 = time.perf_counter()
    workers = [threading.Thread(target=one, args=(w,)) for w in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return latencies, answers, errors, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--via", choices=["v2", "gradio"], default="v2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--artifact", default=None, help="artifact file in the export (default: its first, the fp32 model)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--count", type=int, default=1000, help="test digits cycled through")
    parser.add_argument("--threads", type=int, default=None, help="the server's compute threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()

    catalog = Catalog.from_dirs([args.export_dir])
    key = next(k for k in catalog.keys() if args.artifact is None or k.endswith("/" + args.artifact))
    entry = catalog.entry(key)
    manifest = entry.manifest
    split = read_test_split(manifest.dataset, resolve_data_dir(args.data_dir, manifest.source.data_dir))
    if split is None:
        raise SystemExit(f"no {manifest.dataset} test set: give --data-dir")
    images, labels, _ = split
    images, labels = images[:args.count], labels[:args.count]
    inputs = model_input(images, manifest)
    reference = np.concatenate([catalog.runner(entry)(inputs[i:i + 1]) for i in range(len(inputs))])  # in this process, batch 1

    port = free_port()
    server = start_server(args.export_dir, port, api_only=args.via == "v2", threads=args.threads)
    try:
        time.sleep(1.0)
        before = rss_mib(server.pid)
        if args.via == "v2":
            name = triton_model_name(manifest.source.recipe, entry.artifact)
            latencies, answers, errors, wall = asyncio.run(v2_clients(port, name, manifest.input.name, manifest.output.name,
                                                                      inputs, args.clients, args.seconds))
            same = sum(int(np.argmax(out) == np.argmax(reference[k]) and np.allclose(out, reference[k], atol=1e-4, rtol=1e-4))
                       for k, out in answers)
            correct = sum(int(np.argmax(out) == labels[k]) for k, out in answers)
            max_diff = max((float(np.abs(out - reference[k]).max()) for k, out in answers), default=0.0)
        else:
            folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
            files = []
            for i, chw in enumerate(images):
                files.append(folder / f"{i}.png")
                files[-1].write_bytes(png_bytes(chw))
            latencies, answers, errors, wall = gradio_clients(port, key, files, args.clients, args.seconds)
            names = manifest.classes
            same = sum(int(label == names[int(np.argmax(reference[k]))]) for k, label in answers)
            correct = sum(int(label == names[labels[k]]) for k, label in answers)
            max_diff = None
        after = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    lat = np.array(latencies) * 1e3
    result = {
        "via": args.via, "artifact": key, "clients": args.clients, "seconds": round(wall, 2), "requests": len(answers),
        "errors": len(errors), "first_errors": errors[:3], "correct": correct, "equal_to_in_process": same,
        "max_abs_logit_diff": max_diff,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None, "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "requests_per_s": len(answers) / wall if wall else None,
        "server_rss_mib_before": round(before, 1), "server_rss_mib_after": round(after, 1),
        "machine": f"{cpu_line()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
