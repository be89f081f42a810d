"""``MODEL_CARD.md`` of an export: what the model is, what it was trained on, what each artifact
is, how closely each matches the trained model (``toolkit verify``), how fast it runs
(``toolkit bench``) and how to call it. Written from the manifest and the export's own
``parity.json`` / ``bench.json`` by export, verify and bench, so it is never older than they are.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.core.datasets import preparation_for
from toolkit.core.files import atomic_write
from toolkit.core import side_by_side, speed
from toolkit.core.manifest import TARGET_LINES, Manifest

NAME = "MODEL_CARD.md"
PREPARATION = {
    "digit": "MNIST-style: the paper estimated and removed, ink thresholded, strokes brought to MNIST's width, "
             "the digit fitted into 20x20 and centred by its centre of mass in 28x28 (`toolkit.inference.preprocess.mnist_digit`)",
    "garment": "as Fashion-MNIST made its images: grey, the object light on black (inverted on a light background), "
               "trimmed and its longest side fitted to the frame (`toolkit.inference.preprocess.garment`)",
    "resize": "converted to the model's channels and resized to its side (`toolkit.inference.preprocess.resized_image`)",
}


def _pct(value) -> str:
    return "—" if value is None else f"{value:.2f}%"


def _about(manifest: Manifest) -> list[str]:
    src = manifest.source
    seed = src.seed_results or {}
    name = manifest.name
    lines = [
        f"# {name}: {manifest.model} on {manifest.dataset}",
        "",
        (src.description + ". " if src.description else "")
        + f"{src.params:,} parameters, trained with the recipe `{src.recipe}`"
        + (f" for {src.epochs} epoch{'' if src.epochs == 1 else 's'}" if src.epochs else "") + ".",
        "",
        f"- Checkpoint: `{src.checkpoint}` (sha256 `{src.sha256[:16]}…`); its test accuracy: {_pct(src.test_acc)}.",
    ]
    if seed:
        lines.append(f"- The recipe's write-up ({seed.get('source', 'seed')}) reports {_pct(seed.get('test_acc'))} final"
                     + (f", {_pct(seed.get('best_test_acc'))} best" if seed.get("best_test_acc") is not None else "")
                     + (f", {seed['params']:,} parameters" if seed.get("params") else "")
                     + " for the full recipe; a run with fewer epochs, fewer images or pruning is not comparable with it.")
    return lines


def _input_output(manifest: Manifest) -> list[str]:
    inp, norm = manifest.input, manifest.normalization
    channels, height, width = manifest.chw
    lines: list[str] = []
    lines += [
        "",
        "## Input and output",
        "",
        f"- Input `{inp.name}`: {inp.dtype} {inp.layout} {inp.shape} (batch first, any batch size).",
    ]
    if inp.dtype == "uint8":
        lines.append("- The graph takes raw pixels (0-255) and normalizes them itself: no preprocessing code is needed beyond "
                     "decoding and resizing.")
    else:
        lines.append(f"- Normalization (the caller's job): x / {1 / norm.scale:g}, minus mean {norm.mean}, divided by std {norm.std}, "
                     "per channel, in float32.")
    prep = preparation_for(manifest.dataset, channels)
    lines += [
        f"- Images are prepared {PREPARATION.get(prep, prep)}: {channels} channel(s), {height}x{width}.",
        f"- Output `{manifest.output.name}`: {len(manifest.classes)} logits, in the order of the classes: "
        + ", ".join(manifest.classes[:20]) + (" …" if len(manifest.classes) > 20 else "") + ".",
        "",
        "## Artifacts",
        "",
        "| file | format | precision | bytes | sha256 |",
        "|---|---|---|---:|---|",
    ]
    for art in manifest.artifacts:
        lines.append(f"| {art.file} | {art.format} | {art.precision} | {art.bytes:,} | `{art.sha256[:16]}…` |")
    engines = [(art.file, art.get("built_for")) for art in manifest.artifacts if art.format == "trt" and isinstance(art.get("built_for"), dict)]
    if engines or any(a.get("target") for a in manifest.artifacts):
        lines.append("")
    for art in manifest.artifacts:
        if art.precision == "int8" and art.format == "onnx" and art.get("target") in TARGET_LINES:
            lines.append(f"- {art.file}: {TARGET_LINES[art.get('target')]}.")
    for file, built in engines:
        if built.get("ahead_of_time"):
            lines.append(f"- {file}: built ahead of time on a CPU by TensorRT-RTX {built.get('tensorrt_rtx')} for "
                         f"{_targets(built.get('compute_capability'))}; built, not run here: it runs with TensorRT-RTX's runtime on such a GPU.")
        else:
            lines.append(f"- {file}: built by TensorRT {built.get('tensorrt')} on {built.get('gpu')} (compute capability "
                         f"{built.get('compute_capability')}); it runs on that GPU model only.")
    return lines


def _targets(found) -> str:
    return ", ".join(found) if isinstance(found, list) else str(found)


def _parity(export_dir: Path, manifest: Manifest) -> list[str]:
    lines: list[str] = []
    lines += ["", "## Parity with the trained model (`toolkit verify`)", ""]
    if manifest.parity is None or not any(a.parity for a in manifest.artifacts):
        lines.append(f"Not verified yet: run `toolkit verify {export_dir}`.")
    else:
        v = manifest.parity
        lines += [
            f"On {v.images:,} test images; the PyTorch reference scores {_pct(v.reference_acc)}. Verified on: "
            f"{v.machine or 'an unrecorded machine'}" + (f", ONNX Runtime {v.onnxruntime}" if v.onnxruntime else "") + ". "
            "int8 kernels differ between CPUs: run `toolkit verify` again on the machine you deploy to.",
            "",
            "| artifact | runtime | accuracy | Δ pp | agreement | pipeline agreement | gate |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for art in manifest.artifacts:
            for runtime, p in art.parity.items():
                lines.append(f"| {art.file} | {runtime} | {_pct(p.accuracy)} | {p.delta_pp:+.2f} | {_pct(p.agreement)} | "
                             f"{_pct(p.pipeline_agreement)} | {'passed' if p.passed else '**FAILED**'} |")
        unverified = [a.file for a in manifest.artifacts if not a.parity]
        if unverified:
            lines += ["", f"Not verified: {', '.join(unverified)}."]
    return lines


def _speed(export_dir: Path, bench: dict | None) -> list[str]:
    lines: list[str] = []
    lines += ["", "## Speed (`toolkit bench`)", ""]
    rows = [r for r in (bench or {}).get("results", []) if isinstance(r, dict)]
    if not rows:
        lines.append(f"Not measured yet: run `toolkit bench {export_dir}`.")
    else:
        busy = f" Measured while the machine was busy ({bench['busy']}): a quiet machine does better." if bench.get("busy") else ""
        lines += [f"On {bench.get('machine', 'an unrecorded machine')}, {bench.get('date', '')}; see bench.md for p90/p99.{busy}", "",
                  "| artifact | runtime | batch | p50 µs | images/s | × fp32 |", "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            try:
                lines.append(f"| {r['artifact']} | {r['runtime']} | {r['batch']} | {r['p50_us']:.1f} | {r['images_per_s']:,.0f} | {speed.times_fp32(r)} |")
            except (KeyError, TypeError, ValueError):
                continue
        for file in speed.slower_than_fp32(bench):
            lines += ["", f"**{speed.slower_line(file, bench)}**; int8 pays where its kernels are fast (see docs/export.md)."]
    return lines


def _side_by_side(manifest: Manifest, bench: dict | None) -> list[str]:
    if not any(a.parity for a in manifest.artifacts) and not bench:
        return []
    return ["", "## Every target side by side", "",
            "Parity from `toolkit verify`, speed from `toolkit bench` (images/s; × fp32: over model.fp32.onnx's at the same batch, "
            "on ONNX Runtime's CPU runtime for the other runtimes' files; \"deploy fp32\" where an int8 file is slower there).", "",
            *side_by_side.markdown(manifest, bench)]


def model_card(export_dir: Path, manifest: Manifest, bench: dict | None = None) -> str:
    """The card's text; ``export_dir`` is the directory as the user sees it, ``bench`` its bench.json."""
    lines = [*_about(manifest), *_input_output(manifest), *_parity(export_dir, manifest), *_speed(export_dir, bench),
             *_side_by_side(manifest, bench), *_usage(export_dir, manifest)]
    return "\n".join(lines) + "\n"


def _preparation_lines(manifest: Manifest) -> list[str]:
    """The Python lines that turn ``pixels`` (uint8 HxW or HxWxC) into the graph's input ``x``."""
    inp, channels = manifest.input, manifest.chw[0]
    to_nhwc = [] if inp.layout == "NCHW" else ["x = x.transpose(0, 2, 3, 1)  # this graph takes NHWC"]
    lines = ["x = pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]  # uint8 NCHW"]
    if inp.dtype != "uint8":
        mean = ", ".join(f"{m:g}" for m in manifest.normalization.mean)
        std = ", ".join(f"{s:g}" for s in manifest.normalization.std)
        lines.append(f"x = (x.astype(np.float32) / np.float32({1 / manifest.normalization.scale:g})"
                     f" - np.float32([{mean}]).reshape(1, {channels}, 1, 1)) / np.float32([{std}]).reshape(1, {channels}, 1, 1)")
    return lines + to_nhwc


def _usage(export_dir: Path, manifest: Manifest) -> list[str]:
    inp = manifest.input
    onnx = next((a.file for a in manifest.artifacts if a.format == "onnx"), "model.fp32.onnx")
    lines = [
        "",
        "## How to call it",
        "",
        "With the toolkit (its `serve` extra is enough, no torch: `pip install '.[serve]'` in the toolkit's repository), files, folders or globs:",
        "",
        "```",
        f"toolkit predict {export_dir} image.png more/images/ --top-k 3 --json",
        "```",
        "",
        "In Python with ONNX Runtime (runs as written, with an image file `image.png`; without the toolkit, `pixels` "
        "is a uint8 HxW or HxWxC array prepared as above):",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        "from toolkit.core.manifest import Manifest",
        "from toolkit.inference.preprocess import model_pixels",
        "",
        f'pixels = model_pixels("image.png", Manifest.load("{export_dir}"))  # decoded and prepared as the training images were',
        f'session = ort.InferenceSession("{export_dir / onnx}", providers=["CPUExecutionProvider"])',
        *_preparation_lines(manifest),
        f'logits = session.run(None, {{"{inp.name}": x}})[0]',
        "label = int(logits.argmax(1)[0])",
        "```",
    ]
    return lines + _notes(export_dir, manifest)


def _openvino_usage(export_dir: Path, manifest: Manifest) -> list[str]:
    """The lines that run the export's OpenVINO IR with OpenVINO Runtime (its int8 file where there is one)."""
    irs = [a.file for a in manifest.artifacts if a.format == "openvino"]
    if not irs:
        return []
    ir = next((f for f in irs if ".int8." in f), irs[0])
    return ["", f"With OpenVINO Runtime (`pip install openvino`; {', '.join(irs)}), beside an image file `image.png`:", "",
            "```python", "import openvino as ov", "",
            "from toolkit.core.manifest import Manifest", "from toolkit.inference.preprocess import model_pixels, to_input", "",
            f'manifest = Manifest.load("{export_dir}")',
            'x = to_input(model_pixels("image.png", manifest), manifest)  # decoded, prepared and normalized as in training',
            f'compiled = ov.Core().compile_model("{export_dir / ir}", "CPU")',
            "logits = compiled(x)[0]", "label = int(logits.argmax(1)[0])", "```"]


def _executorch_usage(export_dir: Path, manifest: Manifest) -> list[str]:
    """The lines that run the export's ExecuTorch program with ExecuTorch's runtime (its int8 file where there is one)."""
    programs = [a.file for a in manifest.artifacts if a.format == "executorch"]
    if not programs:
        return []
    program = next((f for f in programs if ".int8." in f), programs[0])
    return ["", f"With ExecuTorch's runtime (`pip install executorch`, beside torch; {', '.join(programs)}; on a phone, the same "
            "file with ExecuTorch's Android or iOS runtime), beside an image file `image.png`:", "",
            "```python", "import torch", "from executorch.runtime import Runtime", "",
            "from toolkit.core.manifest import Manifest", "from toolkit.inference.preprocess import model_pixels, to_input", "",
            f'manifest = Manifest.load("{export_dir}")',
            'x = torch.from_numpy(to_input(model_pixels("image.png", manifest), manifest))  # prepared and normalized as in training',
            f'method = Runtime.get().load_program("{export_dir / program}").load_method("forward")',
            "logits = method.execute([x])[0]", "label = int(logits.argmax(1)[0])", "```"]


def _web_usage(export_dir: Path, manifest: Manifest) -> list[str]:
    """Where the web pages are, how big, and how to host one (any static file server)."""
    pages = [a for a in manifest.artifacts if a.format == "web"]
    if not pages:
        return []
    lines = ["", "In a web browser, with no server of your own (`toolkit export --format web`): a static page that draws or takes an image "
             "and classifies it with ONNX Runtime Web; images never leave the browser."]
    for a in pages:
        model, runtime = a.get("model_bytes"), a.get("runtime_bytes")
        parts = f" (the model {model:,} bytes, ONNX Runtime Web {a.get('onnxruntime_web')} {runtime:,} bytes)" if model and runtime else ""
        lines.append(f"- `{a.file}/` ({a.precision}): {a.bytes:,} bytes in all{parts}.")
    lines += ["", "Host the folder anywhere static files are served (a folder, GitHub Pages, an intranet share), e.g.:", "", "```",
              f"python -m http.server 8000 --directory {export_dir / next((a for a in pages if a.precision == 'fp32'), pages[0]).file}"
              "   # then open http://127.0.0.1:8000/", "```", "",
              "`toolkit serve` serves it too, at /web/. In a page, `await window.toolkitClassify(url)` gives `{label, scores, input}`."]
    return lines


def _notes(export_dir: Path, manifest: Manifest) -> list[str]:
    """What else a caller needs: OpenVINO, ExecuTorch, the web page, int8 on CPUs without VNNI, QAT, Triton."""
    lines: list[str] = _openvino_usage(export_dir, manifest) + _executorch_usage(export_dir, manifest) + _web_usage(export_dir, manifest)
    eight_bit = [a.file for a in manifest.artifacts if a.precision == "int8" and a.format == "onnx" and a.get("weight_bits") == 8]
    if eight_bit:
        lines += ["", f"{', '.join(eight_bit)} on an x86 CPU without VNNI or AMX (`grep -o 'avx512_vnni\\|avx_vnni\\|amx_int8' /proc/cpuinfo` "
                  "finds none): pass `sess_options` with `graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC`. "
                  "ONNX Runtime's fused int8 kernels there add weight x activation products in pairs into 16 bits, which 8-bit weights "
                  "overflow; unfused, the file computes exactly what was verified (toolkit does this by itself)."]
    for art in manifest.artifacts:
        tuned = art.get("qat")
        if tuned:
            epochs = f"{tuned['epochs']} epoch{'' if tuned['epochs'] == 1 else 's'}"
            lines += ["", f"{art.file} was made from the model fine-tuned {epochs} with fake quantization (QAT, "
                      f"distilled from the trained model on {tuned['images']:,} training images); its parity above is against the "
                      "trained model itself."]
    if manifest.triton is not None and manifest.triton.models:
        lines += ["", "As a Triton Inference Server model repository (models: "
                  + ", ".join(f"`{n}`" for n in manifest.triton.models) + "):", "",
                  "```", f"tritonserver --model-repository {export_dir / manifest.triton.repository}", "```", ""]
        lines += [f"- `{name}` ({model.source}): runs on {(model.model_extra or {}).get('runs_on', 'the platform its config names')}"
                  for name, model in manifest.triton.models.items()]
    else:
        lines += ["", f"For Triton Inference Server: `toolkit export {Path(manifest.source.checkpoint).parent} --format triton` "
                  "writes a model repository into this export."]
    return lines


def write_model_card(directory: Path, manifest: Manifest, shown_as: Path | None = None) -> Path:
    """Write the card into ``directory`` (an export, or its staging copy: then ``shown_as`` is the
    export directory the card should name)."""
    path = Path(directory) / NAME
    with atomic_write(path, "w") as f:
        f.write(model_card(Path(shown_as or directory), manifest, speed.load(Path(directory), warn=lambda line: None)))
    return path
