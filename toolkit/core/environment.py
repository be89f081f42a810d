"""What this machine is, for reports and bug reports: the CPU and the features that change integer
kernels, and the versions of everything the toolkit runs on. Nothing here needs torch; each
package is looked up only if it is installed."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

# CPU flags (as /proc/cpuinfo names them) that decide which integer and float kernels run
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "f16c")



def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep what is freed, instead of mapping
    every block over 128 KB fresh from the kernel and unmapping it when freed. A CPU training step
    allocates and frees dozens of activation-sized blocks (2.4 MB each for fine4's 64x12x28x28 maps);
    mapped fresh, each is faulted in page by page on first touch, which on these machines was about a
    fifth of the step (measured in docs/benchmarks.md). The process keeps its peak memory instead of
    returning it. True where it took effect (Linux with glibc); False elsewhere, where nothing changes."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    # glibc caps the mapping threshold at 32 MiB on 64-bit machines; blocks above it are still mapped
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


THREADS_ENV = "TOOLKIT_THREADS"


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset), not the
    machine's: processes that share a machine through affinity do not oversubscribe it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def apply_threads(threads: int | None) -> int:
    """Use ``threads`` compute threads in this process (PyTorch's intra-op pool and every ONNX Runtime
    session made afterwards); None: $TOOLKIT_THREADS, else ``default_threads()``. Returns the number."""
    import sys

    n = threads or int(os.environ.get(THREADS_ENV) or 0) or default_threads()
    os.environ[THREADS_ENV] = str(n)  # runtime.ort_runner reads it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)  # PyTorch sizes its pool from it when imported
    return n


def cpu_info() -> dict:
    """Vendor, model, logical cores and the kernel-relevant instruction-set features present."""
    info = {"vendor": "", "model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "features": []}
    try:
        flags: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "vendor_id" and not info["vendor"]:
                info["vendor"] = value
            elif key == "model name" and value:
                info["model"] = value
            elif key == "flags" and not flags:
                flags = set(value.split())
        info["features"] = [f for f in CPU_FEATURES if f in flags]
    except OSError:  # not Linux: the model name from platform, features unknown
        pass
    return info


INT8_SAFE_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products accumulated in int32


def int8_kernels_saturate(info: dict | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX: there ONNX Runtime's fused int8 kernels multiply
    uint8 x int8 with (V)PMADDUBSW, which adds the products in pairs into int16 and saturates when the
    weights use all 8 bits (255 x 127 x 2 > 32,767). VNNI and AMX accumulate in int32; ARM's dot
    products too. Such a CPU runs 8-bit-weight int8 models unfused (``runtime.ort_runner``)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    info = info or cpu_info()
    return not set(info["features"]) & set(INT8_SAFE_FEATURES)


def cpu_line(info: dict | None = None) -> str:
    """e.g. "AMD EPYC, 2 cores, avx2 fma f16c (no VNNI)"."""
    info = info or cpu_info()
    vnni = any("vnni" in f for f in info["features"])
    return f"{info['model']}, {info['cores']} cores, {' '.join(info['features']) or 'features unknown'}" + ("" if vnni else " (no VNNI)")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    from toolkit import __version__

    info: dict = {"toolkit": __version__, "python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_info()}
    info["torch"] = _version("torch")
    if info["torch"]:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["onnx"] = _version("onnx")
    info["onnxruntime"] = _version("onnxruntime-gpu") or _version("onnxruntime")
    if info["onnxruntime"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        info["tensorrt"] = importlib.import_module("tensorrt").__version__
    except ImportError:
        info["tensorrt"] = None
    # builds engines ahead of time on a CPU (toolkit export --format trt where full TensorRT cannot run)
    info["tensorrt_rtx"] = _version("tensorrt_rtx_cu13_bindings") or _version("tensorrt_rtx")
    info["gradio"] = _version("gradio")
    return info


def env_table(info: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="toolkit env")
    table.add_column("what")
    table.add_column("version / value")
    for key, value in info.items():
        if key == "cpu":
            value = cpu_line(value)
        elif isinstance(value, list):
            value = ", ".join(value)
        table.add_row(key, escape("not installed" if value is None and key in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "gradio")
                                  else str(value)))
    return table
