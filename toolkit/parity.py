"""Parity gates and the comparison of an artifact's answers with the trained model's (NumPy only).

Two paths are compared with the PyTorch reference, which is fed the training pipeline's own
test transform: the *tensor* path (the test split's pixels normalized by the deployed
``preprocess.normalize``) and the *pipeline* path (each test image written as a PNG file in
memory and read back through the whole deployed preprocessing: decode, prepare, normalize).
"""

from __future__ import annotations

import numpy as np

# |delta| in percentage points, and the least top-1 agreement with the reference (percent)
GATES: dict[str, dict[str, float]] = {
    "fp32": {"delta_pp": 0.02, "agreement": 99.9},
    "fp16": {"delta_pp": 0.1, "agreement": 0.0},
    "int8": {"delta_pp": 0.5, "agreement": 0.0},
}
# the pipeline path may lose at most this much agreement against the tensor path (percentage points):
# where the deployed preprocessing matches training, both paths see the same inputs and lose nothing
PIPELINE_SLACK_PP = 0.05
PARITY_FIELDS = ("accuracy", "delta_pp", "agreement", "max_abs_logit_diff", "pipeline_agreement", "passed")  # kept per artifact and runtime


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == labels).mean())


def agreement(logits: np.ndarray, ref_logits: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == ref_logits.argmax(1)).mean())


def compare(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray, ref_acc: float, precision: str, gates=GATES,
            pipeline_logits: np.ndarray | None = None) -> dict:
    """One artifact's parity row: accuracy, delta, agreement and largest logit difference on the
    tensor path, and with ``pipeline_logits`` the pipeline path's accuracy and agreement; ``passed``
    holds every gate. Percentages are kept unrounded."""
    acc = accuracy(logits, labels)
    delta = acc - ref_acc
    agree = agreement(logits, ref_logits)
    gate = gates[precision]
    # a hair of slack for the float rounding of the percentages themselves
    tensor_ok = abs(delta) <= gate["delta_pp"] + 1e-9 and agree >= gate["agreement"] - 1e-9
    row = {"accuracy": acc, "delta_pp": delta, "agreement": agree, "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
           "gate": gate, "tensor_passed": tensor_ok}
    pipeline_ok = True
    if pipeline_logits is not None:
        pipe_agree = agreement(pipeline_logits, ref_logits)
        pipeline_ok = pipe_agree >= max(gate["agreement"], agree - PIPELINE_SLACK_PP) - 1e-9
        row.update(pipeline_accuracy=accuracy(pipeline_logits, labels), pipeline_agreement=pipe_agree,
                   pipeline_max_abs_logit_diff=float(np.abs(pipeline_logits - ref_logits).max()), pipeline_passed=pipeline_ok)
    row["passed"] = tensor_ok and pipeline_ok
    return row
