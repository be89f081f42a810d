"""ExecuTorch's own runtime (``executorch.runtime``) running a ``.pte`` program on this CPU. Its Python
runtime takes torch tensors, so this module imports torch: it is loaded only for ExecuTorch artifacts,
and ``runtime.runtimes_for`` offers it only where ExecuTorch (and so torch) is installed; the torch-free
serving install never reaches it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.core.errors import ToolkitError, first_line


def executorch_runner(path: Path, threads: int | None = None, classes: int | None = None, max_batch: int = 256):
    """``max_batch``: the largest batch the program's memory plan takes (the export's); larger batches run
    in slices of it."""
    import torch
    from executorch.runtime import Runtime

    try:
        method = Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError with its own codes
        raise ToolkitError(f"{path}: ExecuTorch's runtime cannot load it ({first_line(exc)})") from None

    def one(x: np.ndarray) -> np.ndarray:
        try:
            out = method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])[0]
        except Exception as exc:  # noqa: BLE001 - a wrong shape
            raise ToolkitError(f"{path}: ExecuTorch's runtime failed on a batch of shape {tuple(x.shape)} ({first_line(exc)})") from None
        return out.detach().numpy().astype(np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        scores = np.concatenate([one(x[i:i + max_batch]) for i in range(0, len(x), max_batch)]) if len(x) > max_batch else one(x)
        if classes is not None and (scores.ndim != 2 or scores.shape[1] != classes):
            raise ToolkitError(f"{path}: its output {list(scores.shape)} is not one score per class for its manifest's {classes} classes")
        return scores

    return run
