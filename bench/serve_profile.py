"""Where one v2 request's server time goes: `toolkit serve` under load, sampled by py-spy.

    python bench/serve_profile.py exports/<run> --via http --clients 32 --seconds 15

Starts the server and the load as bench/serve_load.py does (client processes × threads on loopback,
batch-1 float tensors), samples every thread of the server process with py-spy (`pip install py-spy`;
it reads the process from outside, so the server runs unchanged) and splits the server's CPU time into
the stages of a request by the innermost frame each sample is in: HTTP/2 or HTTP/1.1 transport and
parsing, the web framework, the v2 service (validation, decoding, response), the batcher's hand-off,
the model (ONNX Runtime), the event loop and the rest. Each stage is shown as a share of the samples
and as server CPU microseconds per request (its share × the server's CPU seconds / requests).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402 - the same server start and clients as the load figures

# (stage, substrings of "function (file)" frames that put a sample in it), innermost frame first
STAGES = [
    ("model (ONNX Runtime)", ["onnxruntime/capi", "runtime.py"]),
    ("batcher hand-off", ["Batcher", "batcher", "call_soon_threadsafe", "run_coroutine_threadsafe", "concurrent/futures"]),
    ("v2 service (validate, decode, respond)", ["toolkit/serve/oip.py", "toolkit/serve/grpc_v2.py", "toolkit/inference/preprocess.py"]),
    ("JSON", ["json/", "orjson"]),
    ("HTTP transport and parsing", ["uvicorn/protocols", "h11/", "httptools"]),
    ("gRPC transport and protobuf", ["grpc/", "grpc_aio", "google/protobuf", "cygrpc"]),
    ("web framework (routing, requests)", ["starlette/", "uvicorn/", "anyio/"]),
    ("event loop", ["asyncio/", "uvloop", "selectors.py"]),
    ("numpy", ["numpy/"]),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for stage, marks in STAGES:
            if any(m in frame for m in marks):
                return stage
    return "other (threads waiting, interpreter)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--via", choices=["http", "grpc"], default="http")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from toolkit.core.environment import cpu_line
    from toolkit.core.files import resolve_data_dir
    from toolkit.core.manifest import triton_model_name
    from toolkit.inference.catalog import Catalog
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.splits import read_test_split

    catalog = Catalog.from_dirs([args.export_dir])
    entry = catalog.entry(None)
    manifest = entry.manifest
    images, _, _ = read_test_split(manifest.dataset, resolve_data_dir(args.data_dir, manifest.source.data_dir))
    inputs = model_input(images[:1000], manifest)
    job = {"via": args.via, "payload": "tensor", "inputs": inputs, "pngs": None, "files": [], "artifact": entry.key,
           "model": triton_model_name(manifest.source.recipe, entry.artifact), "input": manifest.input.name, "output": manifest.output.name}
    port, grpc_port = serve_load.free_port(), serve_load.free_port() if args.via == "grpc" else 0
    job["port"] = grpc_port or port
    server = serve_load.start_server(args.export_dir, port, grpc_port, True, shlex.split(args.server_args))
    raw = Path(tempfile.mkdtemp(prefix="serve-profile-")) / "stacks.txt"
    try:
        time.sleep(1.0)
        spy = {}

        def sample() -> None:  # from the load's start, for its length
            time.sleep(3.0)
            spy["proc"] = subprocess.run(["py-spy", "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)), "--rate",
                                          str(args.rate), "--format", "raw", "--threads", "--subprocesses", "--nonblocking", "--output", str(raw)],
                                         capture_output=True, text=True)

        sampler = threading.Thread(target=sample)
        sampler.start()
        row = serve_load.load(job, args.clients, args.processes, args.seconds, server.pid)
        sampler.join()
        if spy["proc"].returncode != 0 or not raw.exists():
            raise SystemExit(f"py-spy failed: {spy['proc'].stderr[-1000:]}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "(idle)" in stack or not n.isdigit():
            continue
        counts[stage_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    per_request_us = row["server_cpu_per_s"] * 1e6 / row["requests_per_s"]
    stages = [{"stage": s, "share": n / total, "us_per_request": n / total * per_request_us} for s, n in counts.most_common()]
    print(f"{args.via}, {args.clients} clients: {row['requests_per_s']:,.0f} req/s, server CPU {row['server_cpu_per_s']:.2f} s/s "
          f"= {per_request_us:.0f} µs per request; {total:,} busy samples")
    for s in stages:
        print(f"  {s['stage']:<42} {s['share']:6.1%}  {s['us_per_request']:7.1f} µs")
    result = {"via": args.via, "clients": args.clients, "server_args": args.server_args,
              "load": {k: v for k, v in row.items() if k != "answers"}, "us_per_request": per_request_us, "stages": stages,
              "machine": f"{cpu_line()}, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
