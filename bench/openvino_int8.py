"""OpenVINO int8: the export's IR (converted from its int8 QDQ graph) against NNCF's post-training
quantization of its fp32 IR, on accuracy (full test set) and speed (OpenVINO Runtime, CPU).

    python bench/openvino_int8.py EXPORT --data-dir ../shared/data [--json out.json]

EXPORT needs model.fp32.xml and model.int8.xml (`toolkit export RUN --format openvino` with and without
`--precision int8`). NNCF (`pip install nncf`) quantizes model.fp32.xml with the calibration images
`toolkit export` uses (the same 512 training images, same seed), its default preset (symmetric
weights and activations, per-channel weights). Both int8 models are measured against the fp32 IR:
accuracy, Δ pp and agreement on every test image, and images/s at batch 1 and 32 (interleaved rounds;
the median of each). Prints a table and the machine; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nncf_int8(fp32_xml: Path, calib: np.ndarray, out: Path) -> Path:
    """NNCF's post-training int8 of ``fp32_xml``, calibrated on ``calib`` one image at a time."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_xml))
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    ov.save_model(quantized, str(out))
    return out


def logits_of(run, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def speeds(runners: dict, shape: tuple, rounds: int, seconds: float) -> dict:
    """images/s per (name, batch): the median of ``rounds`` interleaved rounds of ``seconds`` each."""
    from toolkit.check.bench import time_calls

    rng = np.random.default_rng(0)
    found: dict = {}
    for batch in (1, 32):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        for _ in range(rounds):
            for name, run in runners.items():
                t = time_calls(run, x, warmup=10, min_iters=20, min_seconds=seconds, max_iters=100_000)
                found.setdefault((name, batch), []).append(batch * 1e6 / float(np.mean(t)))
    return {key: statistics.median(v) for key, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import nncf
    import openvino as ov

    from toolkit.core.environment import cpu_line
    from toolkit.core.manifest import Manifest
    from toolkit.data.sources import source_for_export
    from toolkit.export.quantize import training_slices
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.runtime import openvino_runner

    manifest = Manifest.load(args.export)
    calib, _, _ = training_slices(manifest, args.data_dir, 512)
    x, y, _ = source_for_export(manifest, args.data_dir).tensors(train=False)
    x, y = model_input(x.numpy(), manifest), y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        nncf_xml = nncf_int8(args.export / "model.fp32.xml", calib, Path(tmp) / "model.nncf.xml")
        runners = {"fp32 IR": openvino_runner(args.export / "model.fp32.xml"),
                   "int8 IR from the QDQ graph (exported)": openvino_runner(args.export / "model.int8.xml", exact=False),
                   "int8 IR by NNCF": openvino_runner(nncf_xml, exact=False)}
        logits = {name: logits_of(run, x) for name, run in runners.items()}
        rate = speeds(runners, tuple(manifest.input.shape[1:]), args.rounds, args.seconds)
    ref = logits["fp32 IR"].argmax(1)
    rows = []
    for name, out in logits.items():
        pred = out.argmax(1)
        acc = 100.0 * float((pred == y).mean())
        rows.append({"model": name, "accuracy": acc, "delta_pp": acc - 100.0 * float((ref == y).mean()),
                     "agreement": 100.0 * float((pred == ref).mean()), "images_per_s_b1": rate[(name, 1)], "images_per_s_b32": rate[(name, 32)]})
    report = {"export": str(args.export), "machine": cpu_line(), "openvino": ov.__version__, "nncf": nncf.__version__,
              "images": int(len(y)), "rounds": args.rounds, "rows": rows}
    print(f"{args.export} on {report['machine']}; OpenVINO {report['openvino']}, NNCF {report['nncf']}; {len(y):,} test images")
    print("| model | accuracy | Δ pp | agreement | img/s b1 | img/s b32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy']:.2f}% | {r['delta_pp']:+.2f} | {r['agreement']:.2f}% | "
              f"{r['images_per_s_b1']:,.0f} | {r['images_per_s_b32']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
