"""TensorRT's published rules for an ONNX graph, checked without TensorRT.

A file that breaks one of them cannot become an engine, and TensorRT says so only after its
parser and builder ran (where TensorRT is installed at all). These checks read the graph alone,
so ``toolkit export --format trt`` refuses such a file before building and ``toolkit verify``
says of every ONNX artifact whether TensorRT can take it, naming the node and the rule.

The rules, from NVIDIA's documentation (the ONNX-TensorRT operator table and the developer
guide's "Explicit Quantization" section), kept to those that TensorRT-RTX 1.7's own parser was
seen to enforce (tests/export/test_tensorrt_rtx.py holds each against it):

- operators of the default ONNX domain only (no ONNX Runtime ``com.microsoft`` kernels), and none
  of the integer-arithmetic operators the parser lists as unsupported (ConvInteger,
  MatMulInteger, QLinearConv, QLinearMatMul, DynamicQuantizeLinear);
- QuantizeLinear/DequantizeLinear with all-zero zero points (TensorRT's quantization is
  symmetric; ONNX Runtime's uint8 activations have non-zero ones). A DequantizeLinear of a
  constant int32 tensor (ONNX Runtime's quantized bias) is exempt: the toolkit folds it to its
  float value before building (``toolkit.export.to_trt.fold_int32_dequantize``);
- a uint8 tensor may only be cast (TensorRT computes nothing in uint8: a uint8 Transpose is refused).

Documented rules the parser did not enforce here are not checked (they would refuse files that
build): the opset range (a Conv at opset 7 and at 26 parsed), constant Q/DQ scales (a computed
scale built), int8 rather than uint8 zero points (a zero uint8 zero point built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

UNSUPPORTED_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"})
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    node: str  # the node's op type and name (or index when it has none)
    rule: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}"


def _label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} #{index}"


def violations(proto: onnx.ModelProto) -> list[Violation]:
    """Every broken rule of ``proto``, in graph order (empty: TensorRT can take it)."""
    found: list[Violation] = []
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    uint8 = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.UINT8}
    for index, node in enumerate(graph.node):
        label = _label(node, index)
        if node.domain not in ("", "ai.onnx"):
            found.append(Violation(label, f"operator of domain {node.domain!r}: TensorRT parses the default ONNX domain only"))
            continue
        if node.op_type in UNSUPPORTED_OPS:
            found.append(Violation(label, f"{node.op_type} is not supported by TensorRT's ONNX parser (use Q/DQ pairs around float ops)"))
        if any(name in uint8 for name in node.input) and node.op_type != "Cast":
            found.append(Violation(label, "reads a uint8 tensor: TensorRT only casts uint8 (cast it to float first)"))
        if node.op_type in QDQ:
            found += _qdq_rules(node, label, inits)
    return found


def _qdq_rules(node: onnx.NodeProto, label: str, inits: dict) -> list[Violation]:
    source = inits.get(node.input[0]) if node.input else None
    if node.op_type == "DequantizeLinear" and source is not None and source.data_type == TensorProto.INT32:
        return []  # a quantized bias: folded to a float constant before TensorRT sees it
    zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and numpy_helper.to_array(zero).any():
        kind = TensorProto.DataType.Name(zero.data_type).lower()
        return [Violation(label, f"non-zero {kind} zero point: TensorRT's quantization is symmetric (export with --target tensorrt)")]
    return []


def check_file(path: Path) -> list[Violation]:
    from toolkit.core.onnx_io import load_onnx

    return violations(load_onnx(path))


def summary(found: list[Violation]) -> str:
    """One line: "ok", or the first broken rule and how many more."""
    if not found:
        return "ok"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{found[0]}{more}"
