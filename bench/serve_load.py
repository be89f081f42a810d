"""Load on `toolkit serve`, measured as clients see it: client processes × threads on loopback, each
thread sending real MNIST test digits one request after another (batch 1), for a bounded time.

    python bench/serve_load.py exports/<run> --via http --clients 1,8,32,64         # v2 over HTTP, tritonclient.http
    python bench/serve_load.py exports/<run> --via grpc --payload png                # v2 over gRPC, encoded PNG files
    python bench/serve_load.py exports/<run> --via http --demo                       # the demo running beside the API
    python bench/serve_load.py exports/<run> --via gradio --clients 1,8              # the demo's /predict, gradio_client

Starts `toolkit serve` itself (``--api-only`` unless ``--demo`` or gradio) on free localhost ports, waits
until it is ready, runs each client count in turn with ``--processes`` client processes (the threads
split between them: 32 clients = 4 processes × 8 threads), stops the server, and prints one row per
count: requests, errors, answers equal to the model run in this process, requests/s, p50/p99 latency and
the server's CPU time per second (its processes together; 2.0 = both cores of a 2-core machine) and
its resident memory before and after. The
server's extra options go through ``--server-args``. ``--json`` writes the rows with the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from toolkit.core.environment import cpu_line
from toolkit.core.files import resolve_data_dir
from toolkit.core.manifest import triton_model_name
from toolkit.inference.catalog import Catalog
from toolkit.inference.preprocess import model_input, png_bytes
from toolkit.inference.splits import read_test_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and every process below it (a server's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += (int(stats[pid][11]) + int(stats[pid][12])) / tick
        todo.extend(children.get(pid, []))
    return total


def rss_mib(root: int) -> float:
    """Resident memory of a process and every process below it, MiB."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1])
            todo.extend(int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split())
        except (OSError, StopIteration):
            continue
    return total / 1024


def start_server(export_dir: Path, port: int, grpc_port: int, api_only: bool, extra: list[str]) -> subprocess.Popen:
    import urllib.request

    cmd = [sys.executable, "-m", "toolkit", "serve", str(export_dir), "--port", str(port), "--examples", "0",
           "--grpc-port", str(grpc_port), *(["--api-only"] if api_only else []), *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
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
    raise SystemExit("toolkit serve did not become ready within 180 s")


def _client(via: str, port: int):
    if via == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module, module.InferenceServerClient(f"127.0.0.1:{port}")


def client_process(job: dict) -> dict:
    """One client process: ``job["threads"]`` threads, each with its own client, one request after another
    until the shared stop time. Returns latencies (s), answers ((image index, logits or label)) and errors."""
    inputs, files = job["inputs"], job["files"]
    latencies, answers, errors = [], [], []
    lock = threading.Lock()

    def run(worker: int) -> None:
        i = worker
        if job["via"] == "gradio":
            from gradio_client import Client, handle_file

            client = Client(f"http://127.0.0.1:{job['port']}/", verbose=False)
        else:
            module, client = _client(job["via"], job["port"])
        while time.time() < job["start"]:
            time.sleep(0.001)
        while time.time() < job["stop"]:
            k = i % len(inputs)
            t0 = time.perf_counter()
            try:
                if job["via"] == "gradio":
                    answer = client.predict(handle_file(files[k]), job["artifact"], api_name="/predict")["label"]
                else:
                    if job["payload"] == "png":
                        x = module.InferInput("image", [1], "BYTES")
                        x.set_data_from_numpy(np.array([job["pngs"][k]], dtype=np.object_))
                    else:
                        x = module.InferInput(job["input"], [1, *inputs.shape[1:]], "FP32" if inputs.dtype == np.float32 else "UINT8")
                        x.set_data_from_numpy(inputs[k:k + 1])
                    answer = client.infer(job["model"], [x]).as_numpy(job["output"])[0]
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    answers.append((k, answer))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc)[:200])
            i += job["clients"]
        if job["via"] != "gradio":
            client.close()

    threads = [threading.Thread(target=run, args=(job["first"] + t * job["processes"],)) for t in range(job["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "answers": answers, "errors": errors}


def load(job: dict, clients: int, processes: int, seconds: float, server_pid: int) -> dict:
    processes = min(processes, clients)
    per = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    start = time.time() + 3.0  # every process started and connected before the clock runs
    jobs = [{**job, "clients": clients, "processes": processes, "first": p, "threads": n, "start": start, "stop": start + seconds}
            for p, n in enumerate(per)]
    with mp.get_context("spawn").Pool(processes) as pool:
        pending = pool.map_async(client_process, jobs)
        while time.time() < start:
            time.sleep(0.001)
        cpu0, t0, rss0 = cpu_seconds(server_pid), time.perf_counter(), rss_mib(server_pid)
        while time.time() < start + seconds:
            time.sleep(0.01)
        cpu1, wall, rss1 = cpu_seconds(server_pid), time.perf_counter() - t0, rss_mib(server_pid)
        parts = pending.get(timeout=seconds + 120)
    latencies = np.array([x for p in parts for x in p["latencies"]]) * 1e3
    answers = [a for p in parts for a in p["answers"]]
    errors = [e for p in parts for e in p["errors"]]
    return {"clients": clients, "processes": processes, "threads": per, "seconds": round(wall, 2), "requests": len(answers),
            "errors": len(errors), "first_errors": errors[:3], "requests_per_s": len(answers) / wall,
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "server_cpu_per_s": (cpu1 - cpu0) / wall, "server_rss_mib": [round(rss0, 1), round(rss1, 1)], "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--via", choices=["http", "grpc", "gradio"], default="http")
    parser.add_argument("--payload", choices=["tensor", "png"], default="tensor", help="float tensors or encoded PNG files (v2)")
    parser.add_argument("--clients", default="1,8,32,64", help="client counts, one row each")
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients are split across")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--demo", action="store_true", help="run the Gradio demo beside the v2 API (not --api-only)")
    parser.add_argument("--server-args", default="", help="more `toolkit serve` options, e.g. '--workers 2'")
    parser.add_argument("--artifact", default=None, help="artifact file in the export (default: its first, the fp32 model)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--count", type=int, default=1000, help="test digits cycled through")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
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
    pngs = [png_bytes(chw) for chw in images]
    files = []
    if args.via == "gradio":
        folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
        for i, data in enumerate(pngs):
            files.append(str(folder / f"{i}.png"))
            Path(files[-1]).write_bytes(data)
    job = {"via": args.via, "payload": args.payload, "inputs": inputs, "pngs": pngs if args.payload == "png" else None, "files": files,
           "model": triton_model_name(manifest.source.recipe, entry.artifact), "input": manifest.input.name, "output": manifest.output.name,
           "artifact": key}
    port, grpc_port = free_port(), free_port() if args.via == "grpc" else 0
    job["port"] = grpc_port or port
    api_only = args.via != "gradio" and not args.demo
    server = start_server(args.export_dir, port, grpc_port, api_only, shlex.split(args.server_args))
    rows = []
    try:
        time.sleep(1.0)
        for clients in [int(c) for c in args.clients.split(",")]:
            row = load(job, clients, args.processes, args.seconds, server.pid)
            answers = row.pop("answers")
            if args.via == "gradio":
                row["equal_to_in_process"] = sum(int(label == manifest.classes[int(np.argmax(reference[k]))]) for k, label in answers)
            else:
                row["equal_to_in_process"] = sum(int(np.argmax(out) == np.argmax(reference[k]) and np.allclose(out, reference[k], atol=1e-4))
                                                 for k, out in answers)
            row["correct"] = sum(int((label == manifest.classes[labels[k]]) if args.via == "gradio" else np.argmax(label) == labels[k])
                                 for k, label in answers)
            rows.append(row)
            print(f"{args.via} {args.payload if args.via != 'gradio' else 'png'}{' +demo' if args.demo else ''}, {clients} clients: "
                  f"{row['requests_per_s']:,.0f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                  f"{row['errors']} errors, {row['equal_to_in_process']}/{row['requests']} equal to in-process, "
                  f"server CPU {row['server_cpu_per_s']:.2f} s/s, RSS {row['server_rss_mib'][0]} -> {row['server_rss_mib'][1]} MiB", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    result = {"via": args.via, "payload": args.payload if args.via != "gradio" else "png", "demo": args.demo or args.via == "gradio",
              "server_args": args.server_args, "artifact": key, "rows": rows,
              "machine": f"{cpu_line()}, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
