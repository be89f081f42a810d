"""The `toolkit` command: parses options and calls one function per command, nothing more."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from toolkit.core.errors import Interrupted, ToolkitError, cut, first_line
from toolkit.core.files import is_no_space
from toolkit.core.manifest import MAX_BATCH
from toolkit.core.parity import GATES


def _flag_type(self, ctx):
    """An on/off flag takes no value: show no type (Typer >= 0.2x prints `--json <bool>`, as if it took one)."""
    return None if self.is_flag else _value_type(self, ctx)


_value_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _value_type is not None:  # older Typer shows no type for flags already
    typer.core.TyperOption.display_type_rich = _flag_type

app = typer.Typer(
    help="Train the write-ups' small image classifiers from TOML recipes; prune, quantize and export them; "
    "prove accuracy parity of every artifact; benchmark them; serve them in a Gradio demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATA_DIR_HELP = "Dataset root (default: $TOOLKIT_DATA_DIR, else the folder the run was trained from, else ~/.cache/toolkit/data)."
JSON_HELP = "Print one JSON object last on stdout (progress goes to stderr)."
DEBUG_FLAG = "--debug"


# options several commands share
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help=DATA_DIR_HELP)]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
AsJson = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
Runs = Annotated[Path, typer.Option("--runs", help="Where to look for the latest run.")]
Exports = Annotated[Path, typer.Option("--exports", help="Where to look for the latest export.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="Compute threads (PyTorch and ONNX Runtime; default: "
                                                "$TOOLKIT_THREADS, else the cores this process may use). Lower it when "
                                                "several jobs share the machine; 1 is often fastest for batch 1.")]
RunRef = Annotated[Optional[Path], typer.Argument(help="Run directory or checkpoint (default: the latest run under --runs).")]


def _show_version(value: bool) -> None:
    if value:
        from toolkit import __version__

        sys.stdout.write(f"toolkit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, DEBUG_FLAG, help="On an error, show the full traceback instead of one line (for bug reports; "
                               "also TOOLKIT_DEBUG=1). Accepted after any command too."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the toolkit's version and exit."),
) -> None:
    # main() reads --debug from the command line before Typer parses it; this only documents it
    pass


def _threads(threads: int | None) -> None:
    from toolkit.core.environment import apply_threads

    apply_threads(threads)


LOG_WIDTH = 200  # columns for tables written to a log file, CI or a pipe (rich assumes 80 there)


def _out(stderr: bool = False) -> Console:
    """A console whose messages are one line however narrow the terminal (soft wrap), and whose
    tables are not cut to 80 columns when the output is a log file, CI or a pipe."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


def _console(as_json: bool) -> Console:
    return _out(stderr=as_json)


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe file (recipes/fine4.toml) or name (fine4)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the recipe's epoch count."),
    device: Device = "auto",
    data_dir: DataDir = None,
    out: Path = typer.Option(Path("runs"), "--out", help="Parent folder for run directories."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the recipe's random seed."),
    seeds: Optional[str] = typer.Option(None, "--seeds", metavar="1,2,3", help="Train once per seed: a run directory each and a table "
                                        "of best/final accuracy (mean ± sd) in OUT/<recipe>-seeds-<time>.md and .json. On a GPU the seeds "
                                        "train together (one CUDA stream each); on the CPU one after the other."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run directory from its last.pt."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="fast (data resident on the device, batch-wise augmentation) | dataloader (per-sample "
        "transforms, as the write-ups ran). Default: the recipe's."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes (dataloader pipeline)."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", min=1, help="Use only the first N training images (smoke runs)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="Use only the first N test images (smoke runs)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="Change one recipe setting, "
                                                  "e.g. --set optimizer.lr=0.02 --set data.batch_size=256 (any dotted recipe key; "
                                                  "repeat for more). Checked like the recipe file. The run's recipe.toml records the result."),
    compile_mode: str = typer.Option("none", "--compile", help="torch.compile the training step: none | default | reduce-overhead (adds CUDA graphs on a "
        "GPU) | max-autotune. Compiling costs tens of seconds up front."),
    engine: str = typer.Option("auto", "--engine", help="auto | eager | graph. graph: each training step is one unit on the device "
                               "(batch, augmentation, forward, backward, fused SGD, schedule, metrics), captured in CUDA graphs of 32 steps on a GPU and "
                               "run uncaptured on the CPU; eager: the step-by-step loop (the reference). auto: graph where the run allows it "
                               "(fast pipeline, one process, no --compile), with one line saying which ran and why."),
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Train a recipe (a file, a built-in name such as fine4, or a run's recipe.toml); writes runs/<recipe>-<timestamp>/
    with best.pt, last.pt, recipe.toml (the resolved recipe), metrics.csv, curves.png. A recipe with dataset = "folder"
    trains on a folder of your own images (one sub-folder per class; docs/training.md, "Your own images")."""
    _threads(threads)
    from toolkit.models.recipes import load_recipe
    from toolkit.train.run import train as run_training

    if recipe is None and resume is None:
        raise ToolkitError("give a recipe (e.g. recipes/fine4.toml) or --resume RUN_DIR")
    if resume is not None and overrides:
        raise ToolkitError("--set changes a recipe; a resumed run keeps the recipe it started with")
    if seeds is not None:
        from toolkit.train.run import parse_seeds, train_seeds

        if recipe is None or resume is not None:
            raise ToolkitError("--seeds trains new runs of a recipe: give a recipe, not --resume")
        results, summary = train_seeds(load_recipe(recipe, overrides), parse_seeds(seeds), device=device, data_dir=data_dir, out=out,
                                       epochs=epochs, seed=seed, pipeline=pipeline, workers=workers, train_limit=train_limit,
                                       test_limit=test_limit, console=_console(as_json), compile=compile_mode, overrides=overrides, engine=engine)
        if as_json:
            _emit({"runs": [r.as_json() for r in results], "summary": str(summary)})
        return
    result = run_training(
        load_recipe(recipe, overrides) if recipe and resume is None else None,
        device=device, data_dir=data_dir, out=out, epochs=epochs, seed=seed, resume=resume,
        pipeline=pipeline, workers=workers, train_limit=train_limit, test_limit=test_limit, console=_console(as_json), compile=compile_mode,
        overrides=overrides, engine=engine,
    )
    if as_json and result.main_process:
        _emit(result.as_json())


@app.command()
def recipes(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Folder of recipe files (default: the bundled recipes/)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List every recipe: dataset, model, parameters, epochs and the write-up's best test accuracy."""
    from toolkit.train.report import recipe_rows, recipes_table
    from toolkit.models.recipes import RECIPES_DIR

    rows = recipe_rows(directory or RECIPES_DIR)
    if as_json:
        _emit(rows)
    else:
        _out().print(recipes_table(rows))


@app.command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint or run directory (default: the latest run)."),
    data_dir: DataDir = None,
    device: Device = "auto",
    runs: Runs = Path("runs"),
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Test accuracy, per-class accuracy and a confusion-matrix PNG for a trained model."""
    _threads(threads)
    from toolkit.models.checkpoint import latest_run
    from toolkit.train.evaluate import evaluate_checkpoint

    console = _console(as_json)
    report = evaluate_checkpoint(checkpoint or latest_run(runs, say=lambda line: console.print(f"eval: {line}")), data_dir=data_dir,
                                 device=device, console=console)
    if as_json:
        _emit(report)


@app.command()
def prune(
    run: RunRef = None,
    method: str = typer.Option("channel", "--method", help="channel (removes channels: smaller params, MACs, ONNX) | l1-unstructured (global "
        "magnitude sparsity)."),
    amount: float = typer.Option(0.3, "--amount", help="Fraction of channels (channel) or weights (l1-unstructured) to remove."),
    finetune_epochs: int = typer.Option(2, "--finetune-epochs", min=0, help="Fine-tuning epochs with the recipe's optimizer."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the latest run; the pruned run is written beside its source."),
    data_dir: DataDir = None,
    device: Device = "auto",
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Prune a trained model, fine-tune it into a new run, and report params, MACs, sparsity and accuracy before and after."""
    _threads(threads)
    from toolkit.train.prune import prune as run_prune

    report = run_prune(run, method=method, amount=amount, finetune_epochs=finetune_epochs, runs=runs, data_dir=data_dir,
                       device=device, console=_console(as_json))
    if as_json:
        _emit(report)


TRT_ARCH_HELP = ("TensorRT-RTX (no GPU here: the engine is built ahead of time): the GPU architectures to build for, comma-separated, "
                 "from sm75, sm80, sm86, sm89, sm120, sm121 (e.g. sm89 for an RTX 4090). Default: TensorRT-RTX's own (8.0, 8.6, 8.9, 12.0 "
                 "and later). Full TensorRT builds for this machine's GPU and takes no --trt-arch.")
ORT_WEB_HELP = ("--format web: a folder holding ONNX Runtime Web's dist files (npm install onnxruntime-web: "
                "node_modules/onnxruntime-web/dist), checked against the pinned version. Default: fetched once from the npm registry "
                "into ~/.cache/toolkit.")
PAD_CHANNELS_HELP = ("Zero-pad conv channels to this multiple where outputs stay exactly the same (16: ONNX Runtime's AVX-512 block, "
                     "8: AVX2): faster batch-1 latency on ONNX Runtime CPU for models with odd channel counts. 0: off (for the int8 file "
                     "too). Default: as the existing export, else off; the CPU target's int8 file is padded to 16 on its own (exact, and "
                     "faster there). Changing it re-exports the fp32 ONNX and drops the artifacts derived from it.")


@app.command()
def export(
    run: RunRef = None,
    fmt: str = typer.Option("onnx", "--format", 
        help="onnx | trt (TensorRT engine; needs toolkit\\[trt] and an NVIDIA GPU) | openvino (OpenVINO IR, .xml and .bin, "
        "for OpenVINO Runtime; needs toolkit\\[openvino]) | executorch (a .pte lowered to XNNPACK, fp32 or int8; needs "
        "executorch) | web (a static page in <export>/web/ that classifies in the browser with ONNX Runtime Web, no server) | triton (a Triton "
        "Inference Server model repository in <export>/triton/, from the ONNX artifact and any "
        "engine of --precision)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 (static QDQ quantization, calibrated on training images)."),
    out: Path = typer.Option(Path("exports"), "--out", help="Parent folder of export directories."),
    runs: Runs = Path("runs"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP + " Needed for int8 calibration."),
    calib_size: int = typer.Option(512, "--calib-size", min=1, help="Training images used to calibrate int8."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | entropy | percentile."),
    auto_fallback: bool = typer.Option(False, "--auto-fallback", help="int8: keep the most sensitive layers in float until the int8 gate holds (measured on "
        "held-out training images)."),
    target: Optional[str] = typer.Option(None, "--target", help="Where the int8 file will run. cpu: uint8 activations and int8 weights, the "
                                         "format ONNX Runtime's x86 kernels run fastest. tensorrt: symmetric int8 (explicit quantization), "
                                         "what TensorRT builds from. Default: tensorrt with --format trt, else cpu."),
    int8_activations: Optional[str] = typer.Option(None, "--int8-activations", help="Overrides --target's activation type. int8: symmetric, "
                                                   "runs on ONNX Runtime and builds TensorRT engines | uint8: asymmetric, faster on ONNX "
                                                   "Runtime's x86 CPU kernels, no TensorRT."),
    int8_weights: int = typer.Option(8, "--int8-weights", help="8: full int8 weights (TensorRT, GPUs, CPUs with VNNI/AMX; an x86 CPU without VNNI "
                                     "runs them unfused: exact, but no int8 speed-up) | 7: ONNX Runtime's reduce_range, fused int8 kernels on "
                                     "every x86 CPU, at a cost in accuracy."),
    qat_epochs: int = typer.Option(0, "--qat-epochs", min=0, help="int8: first fine-tune this many epochs with fake quantization "
                                   "(quantization-aware training, distilled from the trained model on its training images), then export as "
                                   "usual: same operators and speed. The remedy where post-training int8 misses its gate (e.g. with "
                                   "--int8-weights 7). 0: post-training quantization only."),
    qat_images: Optional[int] = typer.Option(None, "--qat-images", min=1, help="QAT: fine-tune on this many training images (default: all but "
                                             "the 2,000 held out for --auto-fallback)."),
    max_batch: int = typer.Option(MAX_BATCH, "--max-batch", min=1, help="TensorRT: largest batch of the optimization profile; Triton: max_batch_size."),
    trt_arch: Optional[str] = typer.Option(None, "--trt-arch", help=TRT_ARCH_HELP),
    ort_web: Optional[Path] = typer.Option(None, "--ort-web", help=ORT_WEB_HELP),
    pad_channels: Optional[int] = typer.Option(None, "--pad-channels", min=0, help=PAD_CHANNELS_HELP),
    input_dtype: str = typer.Option("float32", "--input", help="float32: the graph takes normalized float tensors. uint8: it takes raw "
                                    "uint8 NCHW pixels and normalizes them itself (no preprocessing code needed in C++, C#, JavaScript ...); "
                                    "written as its own export, exports/<run>-uint8/."),
    layout: str = typer.Option("NCHW", "--layout", help="NCHW: channels first, as PyTorch. NHWC: channels last, as image arrays "
                               "are laid out (height, width, channel), e.g. with --input uint8 for a graph that takes decoded images as "
                               "they are; written as its own export, exports/<run>[-uint8]-nhwc/."),
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Export a trained run to exports/<run>/ (ONNX, int8 QDQ ONNX, TensorRT, a Triton repository) and record it in manifest.json."""
    _threads(threads)
    from toolkit.export import export as run_export

    entry = run_export(run, fmt=fmt, precision=precision, out=out, runs=runs, data_dir=data_dir, calib_size=calib_size,
                       calib_method=calib_method, auto_fallback=auto_fallback, int8_activations=int8_activations, target=target,
                       int8_weights=int8_weights, qat_epochs=qat_epochs, qat_images=qat_images,
                       max_batch=max_batch, pad_channels=pad_channels, input_dtype=input_dtype, layout=layout,
                       trt_arch=tuple(a.strip().lower() for a in trt_arch.split(",")) if trt_arch is not None else None, ort_web=ort_web,
                       console=_console(as_json))
    if as_json:
        _emit(entry)


@app.command()
def verify(
    export_dir: Optional[Path] = typer.Argument(None, help="Export directory (default: the latest under --exports)."),
    exports: Exports = Path("exports"),
    data_dir: DataDir = None,
    fp32_delta: float = typer.Option(GATES["fp32"]["delta_pp"], "--fp32-delta", min=0, help="fp32 gate: largest |accuracy delta| in points."),
    fp32_agreement: float = typer.Option(GATES["fp32"]["agreement"], "--fp32-agreement", min=0, max=100, help="fp32 gate: least top-1 agreement (%)."),
    fp16_delta: float = typer.Option(GATES["fp16"]["delta_pp"], "--fp16-delta", min=0, help="fp16 gate: largest |accuracy delta| in points."),
    int8_delta: float = typer.Option(GATES["int8"]["delta_pp"], "--int8-delta", min=0, help="int8 gate: largest |accuracy delta| in points."),
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Run the full test set through PyTorch and every artifact on every runtime present; exit 1 if any misses its gate."""
    _threads(threads)
    from toolkit.check.verify import verify as run_verify

    gates = {"fp32": {**GATES["fp32"], "delta_pp": fp32_delta, "agreement": fp32_agreement}, "fp16": {**GATES["fp16"], "delta_pp": fp16_delta},
             "int8": {**GATES["int8"], "delta_pp": int8_delta}}
    report = run_verify(export_dir, exports=exports, data_dir=data_dir, gates=gates, console=_console(as_json))
    if as_json:
        _emit(report)
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
def bench(
    export_dir: Optional[Path] = typer.Argument(None, help="Export directory (default: the latest under --exports)."),
    exports: Exports = Path("exports"),
    batch: str = typer.Option("1,32,256", "--batch", help="Comma-separated batch sizes."),
    min_seconds: float = typer.Option(1.0, "--min-seconds", min=0, help="Time each case at least this long."),
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Latency p50/p90/p99 and images/s per artifact and runtime (PyTorch eager included), beside the parity results."""
    _threads(threads)
    from toolkit.check.bench import bench as run_bench

    try:
        batches = tuple(int(b) for b in batch.split(",") if b.strip())
    except ValueError:
        raise ToolkitError(f"--batch must be comma-separated integers, not {batch!r}") from None
    if not batches or min(batches) < 1:
        raise ToolkitError("--batch needs at least one batch size of 1 or more")
    report = run_bench(export_dir, exports=exports, batches=batches, min_seconds=min_seconds, threads=threads, console=_console(as_json))
    if as_json:
        _emit(report)


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="[EXPORT_OR_RUN] then image files, folders (searched recursively) and glob patterns "
                                      "(quote them). The first path is the model when it is an export directory, a run directory "
                                      "or a .pt checkpoint; without one, the latest export under --exports."),
    exports: Exports = Path("exports"),
    artifact: Optional[str] = typer.Option(None, "--artifact", help="Which artifact of the export, as the demo names it: "
                                           "<export>/<file>, e.g. fine4-20261123-101500/model.int8.onnx, or the file alone when one export has it "
                                           "(default: the fastest artifact that passed its "
                                           "parity gate by this machine's latest toolkit bench; without one, the fp32 model)."),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Classes reported per image."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per model run (1 runs exactly as the demo does)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file."),
    threads: Threads = None,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout (JSON Lines) instead of a table."),
) -> None:
    """Classify image files with an export (torch-free, the demo's own code path) or a run's checkpoint (PyTorch).
    A file that cannot be read is an error row; exit 1 if any image failed."""
    _threads(threads)
    from toolkit.serve.predict import is_model_ref, predict as run_predict, rows_table, write_csv

    model = Path(paths[0]) if is_model_ref(paths[0]) else None
    inputs = paths[1:] if model is not None else paths
    console = _out(stderr=True)
    rows = run_predict(model, inputs, artifact=artifact, top_k=top_k, batch=batch, exports=exports, threads=threads, console=console)
    if csv_path is not None:
        write_csv(rows, csv_path, top_k)
        console.print(f"predict: wrote {csv_path}", markup=False)
    if as_json:
        for row in rows:
            _emit(row)
    else:
        _out().print(rows_table(rows))
    failed = sum(1 for r in rows if r["error"])
    if failed:
        console.print(f"[bold red]error:[/] {failed} of {len(rows)} image(s) could not be classified (see the error rows)")
        raise typer.Exit(1)


@app.command("env")
def env_command(as_json: AsJson = False) -> None:
    """Versions of the toolkit, Python, torch, ONNX Runtime (and its providers), TensorRT, CUDA and the GPU, and the CPU: for bug reports."""
    from toolkit.core.environment import describe, env_table

    info = describe()
    if as_json:
        _emit(info)
    else:
        _out().print(env_table(info))


@app.command()
def serve(
    export_dirs: Optional[list[Path]] = typer.Argument(None, help="Export folders, or folders of them (default: every export under ./exports)."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="TOOLKIT_HOST", help="Interface to bind; 0.0.0.0 serves other machines (the Docker image does)."),
    port: int = typer.Option(7860, "--port", envvar="TOOLKIT_PORT", min=1, max=65535, help="TCP port."),
    data_dir: DataDir = None,
    top_k: int = typer.Option(3, "--top-k", min=1, help="Classes shown per prediction."),
    examples: int = typer.Option(8, "--examples", min=0, help="Real MNIST test digits offered as examples (sampled at start-up, when the data is there)."),
    max_upload: str = typer.Option("10mb", "--max-upload", help="Largest upload: a demo file or a /v2 request body, in decimal units (10mb = 10,000,000 "
        "bytes)."),
    share: bool = typer.Option(False, "--share", help="Also open a public gradio.live link (off by default; needs the internet)."),
    api_only: bool = typer.Option(False, "--api-only", help="Serve only the v2 inference API (no Gradio demo; needs only toolkit\\[api])."),
    batch_delay_ms: float = typer.Option(1.0, "--batch-delay-ms", min=0, max=100, help="v2 API: how long a batch may wait for more "
                                         "requests when the server is busy (requests that arrive together are batched)."),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", envvar="TOOLKIT_GRPC_PORT", min=0, max=65535, help="The v2 API over gRPC "
                                            "(tritonclient.grpc) on this port, beside HTTP: the same models, batches and limits. Default: 8001 "
                                            "with --api-only (as Triton), else off; 0: off."),
    threads: Threads = None,
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Server processes sharing the port, each with its own "
                                "model sessions (--api-only; HTTP and gRPC): more requests per second where cores allow."),
) -> None:
    """Serve the exported models: the Gradio demo (with its endpoint /predict) and, on the same port, the Open Inference
    Protocol (KServe v2) under /v2, which tritonclient.http talks to as it talks to Triton; with --api-only also over gRPC
    (port 8001). Needs only toolkit\\[serve], no torch."""
    _threads(threads)
    from toolkit.serve.server import serve as run_serve

    if grpc_port is None:
        grpc_port = GRPC_PORT if api_only else 0
    run_serve(export_dirs or [Path("exports")], host=host, port=port, data_dir=data_dir, top_k=top_k, examples=examples,
              max_upload=max_upload, share=share, api_only=api_only, batch_delay_ms=batch_delay_ms, grpc_port=grpc_port,
              console=_out(stderr=True), workers_count=workers)


GRPC_PORT = 8001  # Triton's


# the extra a command's missing import belongs to, for a one-line hint instead of a traceback
INSTALL_HINTS = {
    "gradio": "serve", "starlette": "api", "uvicorn": "api", "onnxruntime": "serve", "PIL": "serve", "pydantic": "serve", "filelock": "serve",
    "torch": "train", "torchvision": "train", "albumentations": "train", "onnx": "train",
    "onnxscript": "train", "onnxslim": "train", "torch_pruning": "train", "matplotlib": "train",
}


def _interrupt(signum: int, _frame) -> None:
    raise Interrupted(signum)


def _failure(exc: BaseException) -> tuple[str, int]:
    """The one line and exit status for an error that is not a ToolkitError."""
    if isinstance(exc, ModuleNotFoundError) and INSTALL_HINTS.get((exc.name or "").split(".")[0]):
        extra = INSTALL_HINTS[(exc.name or "").split(".")[0]]
        return f"this command needs {exc.name}, which is not installed: pip install '.[{extra}]' in the toolkit's repository", 2
    if is_no_space(exc):
        return "no space left on the device" + (f" ({exc.filename})" if getattr(exc, "filename", None) else ""), 2
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch, or close other programs)", 2
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or first_line(exc)}{where}", 2
    return (f"internal error, a bug in toolkit ({type(exc).__name__}: {first_line(exc)}); "
            f"run again with {DEBUG_FLAG} (or TOOLKIT_DEBUG=1) to see the traceback, and report it"), 1


def main() -> None:
    """Run the CLI: every error ends in one line on stderr and a non-zero exit, never a traceback
    (unless --debug or TOOLKIT_DEBUG=1 asks for it). SIGINT / SIGTERM: "interrupted", exit 130 / 143,
    after every temporary file and staging copy has been removed on the way out."""
    debug = DEBUG_FLAG in sys.argv[1:] or os.environ.get("TOOLKIT_DEBUG", "") not in ("", "0")
    sys.argv[1:] = [a for a in sys.argv[1:] if a != DEBUG_FLAG]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        status = app(standalone_mode=False)  # usage errors come back here, for the one-line form below
        raise SystemExit(status if isinstance(status, int) else 0)
    except typer.TyperException as exc:  # a usage error: a bad option value, an unknown option or command
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "toolkit"
        message = " ".join(exc.format_message().split())
        if not message:  # `toolkit` alone: the help was the answer
            raise SystemExit(getattr(exc, "exit_code", 2)) from None
        err.print(f"[bold red]error:[/] {escape(where)}: {escape(cut(message))} (see {escape(where)} --help)")
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except typer.Abort:
        err.print("aborted")
        raise SystemExit(1) from None
    except Interrupted as stop:
        err.print("interrupted" if stop.signum == signal.SIGINT else f"{signal.Signals(stop.signum).name}: stopped")
        raise SystemExit(128 + stop.signum) from None
    except ToolkitError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(2) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback for a user
        if debug:
            raise
        message, status = _failure(exc)
        err.print(f"[bold red]error:[/] {escape(str(ToolkitError(message)))}")  # ToolkitError: one line, bounded
        raise SystemExit(status) from None
    finally:
        _work_done()


def _work_done() -> None:
    """The command has ended and its exit status is decided: from here a SIGINT / SIGTERM would only
    raise Interrupted inside the interpreter's shutdown (a traceback, and exit 0 or a silent death).
    Ignored: the finished work's status stands."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
