"""The served demo measured as a client sees it: real MNIST test digits sent one by one to the
`/predict` API with gradio_client, accuracy and round-trip latency per artifact.

    python bench/serve_api.py exports/<run> --data-dir ../shared/data --count 1000

Starts `toolkit serve` on a free localhost port in this process, so nothing else need run.
"""

from __future__ import annotations

import argparse
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core.files import resolve_data_dir
from toolkit.inference.catalog import Catalog
from toolkit.serve.server import mnist_test_digits, serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    digits = mnist_test_digits(resolve_data_dir(args.data_dir), args.count, seed=args.seed)
    if not digits:
        raise SystemExit(f"no MNIST test set under {resolve_data_dir(args.data_dir)}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running, url = serve([args.export_dir], port=port, data_dir=args.data_dir, examples=0, block=False)
    client = Client(url, verbose=False)
    print(f"{len(digits)} random MNIST test digits (seed {args.seed}) -> {url}predict, one request at a time; "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    catalog = Catalog.from_dirs([args.export_dir])
    print("| artifact | correct | accuracy | same answer as calling the model directly | round trip p50 ms | p90 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (pixels, label) in enumerate(digits):
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(pixels).save(path)
            paths.append((str(path), str(label)))
        for key in catalog.keys():
            client.predict(handle_file(paths[0][0]), key, api_name="/predict")  # load the model first
            correct, same, times = 0, 0, []
            for (path, label), (pixels, _) in zip(paths, digits):
                t0 = time.perf_counter()
                result = client.predict(handle_file(path), key, api_name="/predict")
                times.append((time.perf_counter() - t0) * 1e3)
                correct += result["label"] == label
                same += result["label"] == catalog.classify(Image.fromarray(pixels), key).best
            print(f"| {key} | {correct}/{len(paths)} | {100 * correct / len(paths):.2f}% | {same}/{len(paths)} | "
                  f"{np.percentile(times, 50):.1f} | {np.percentile(times, 90):.1f} |")
    running.close()


if __name__ == "__main__":
    main()
