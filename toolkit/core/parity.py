"""Parity gates and the comparison of an artifact's answers with the trained model's (NumPy, and
SciPy for the confidence interval of an accuracy difference).

Two paths are compared with the PyTorch reference, which is fed the training pipeline's own
test transform: the *tensor* path (the test split's pixels normalized by the deployed
``preprocess.normalize``) and the *pipeline* path (each test image written as a PNG file in
memory and read back through the whole deployed preprocessing: decode, prepare, normalize).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolkit.core.files import sha256_file

# |delta| in percentage points, and the least top-1 agreement with the reference (percent)
GATES: dict[str, dict[str, float]] = {
    "fp32": {"delta_pp": 0.02, "agreement": 99.9},
    "fp16": {"delta_pp": 0.1, "agreement": 0.0},
    "int8": {"delta_pp": 0.5, "agreement": 0.0},
}
# the pipeline path may lose at most this much agreement against the tensor path (percentage points):
# where the deployed preprocessing matches training, both paths see the same inputs and lose nothing
PIPELINE_SLACK_PP = 0.05
# kept per artifact and runtime
PARITY_FIELDS = ("accuracy", "delta_pp", "delta_ci_pp", "agreement", "max_abs_logit_diff", "pipeline_agreement", "passed", "gate")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == labels).mean())


def agreement(logits: np.ndarray, ref_logits: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == ref_logits.argmax(1)).mean())


def delta_interval(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> dict:
    """How well these test images tell the artifact's accuracy from the reference's. Paired by image:
    only the images that one of the two gets right and the other wrong carry the difference
    (``gained``: the artifact right, the reference wrong; ``lost``: the reverse). The exact McNemar
    test (``scipy.stats.binomtest``: under no difference each such image goes either way with
    probability 1/2) gives the p-value, and the exact interval for the share of gains among them,
    scaled by their number, the interval of delta in percentage points."""
    from scipy.stats import binomtest

    art_ok, ref_ok = logits.argmax(1) == labels, ref_logits.argmax(1) == labels
    gained, lost = int((art_ok & ~ref_ok).sum()), int((~art_ok & ref_ok).sum())
    changed = gained + lost
    if changed == 0:
        return {"gained": 0, "lost": 0, "delta_ci_pp": [0.0, 0.0], "confidence": confidence, "mcnemar_p": 1.0}
    test = binomtest(gained, changed, 0.5)
    low, high = test.proportion_ci(confidence_level=confidence)
    scale = 100.0 * changed / len(labels)
    return {"gained": gained, "lost": lost, "delta_ci_pp": [scale * (2 * low - 1), scale * (2 * high - 1)], "confidence": confidence,
            "mcnemar_p": float(test.pvalue)}


def compare(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray, ref_acc: float, precision: str, gates=GATES,
            pipeline_logits: np.ndarray | None = None) -> dict:
    """One artifact's parity row: accuracy, delta, agreement and largest logit difference on the
    tensor path, delta's confidence interval (``delta_interval``), and with ``pipeline_logits`` the
    pipeline path's accuracy and agreement; ``passed`` holds every gate (on delta itself, not its interval). Percentages are kept unrounded."""
    acc = accuracy(logits, labels)
    delta = acc - ref_acc
    agree = agreement(logits, ref_logits)
    gate = gates[precision]
    # a hair of slack for the float rounding of the percentages themselves
    tensor_ok = abs(delta) <= gate["delta_pp"] + 1e-9 and agree >= gate["agreement"] - 1e-9
    row = {"accuracy": acc, "delta_pp": delta, "agreement": agree, "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
           **delta_interval(logits, ref_logits, labels), "gate": gate, "tensor_passed": tensor_ok}
    pipeline_ok = True
    if pipeline_logits is not None:
        pipe_agree = agreement(pipeline_logits, ref_logits)
        pipeline_ok = pipe_agree >= max(gate["agreement"], agree - PIPELINE_SLACK_PP) - 1e-9
        row.update(pipeline_accuracy=accuracy(pipeline_logits, labels), pipeline_agreement=pipe_agree,
                   pipeline_max_abs_logit_diff=float(np.abs(pipeline_logits - ref_logits).max()), pipeline_passed=pipeline_ok)
    row["passed"] = tensor_ok and pipeline_ok
    return row


# verify's report files. They are written as hidden ``.NAME.pending`` first; the manifest, saved
# next with the report's sha256 (``Verified.report_sha256``), is the commit point; then they are
# moved into place. ``settle_report`` finishes or drops what a kill in between left.
REPORT, REPORT_MD, PENDING = "parity.json", "parity.md", ".pending"


def pending(export_dir: Path, name: str) -> Path:
    return Path(export_dir) / f".{name}{PENDING}"


def settle_report(export_dir: Path, manifest) -> str | None:
    """A verify killed after writing its pending report: committed (the manifest holds the report's
    sha256) -> moved into place; not committed -> removed, leaving the previous report and manifest,
    which agree. Returns what was done, or None. Call it holding the export's lock."""
    export_dir = Path(export_dir)
    files = [pending(export_dir, REPORT), pending(export_dir, REPORT_MD)]
    if not any(p.exists() or p.is_symlink() for p in files):
        return None
    committed = manifest.parity.report_sha256 if manifest.parity is not None else None
    report = files[0]
    if report.is_file() and not report.is_symlink() and committed is not None and sha256_file(report) == committed:
        for path, name in ((files[1], REPORT_MD), (report, REPORT)):  # parity.json last: its arrival completes it
            if path.is_file() and not path.is_symlink():
                os.replace(path, export_dir / name)
        return f"finished the parity report an interrupted verify had committed in {export_dir}"
    for path in files:
        path.unlink(missing_ok=True)
    return f"dropped the parity report an interrupted verify had not committed in {export_dir}"
