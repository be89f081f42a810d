"""Reading ONNX files toolkit made: self-contained, parsed at the one boundary for user files.

Layer 2 (below the export and quantize stages, which both read ONNX files). Needs the ``onnx``
package, which the torch-free serving install does not have: serving hands files to ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import reading


def load_onnx(path: Path) -> onnx.ModelProto:
    """An ONNX file toolkit reads (its own artifacts): self-contained, or a one-line error. External
    data would be read from wherever its ``location`` (or a symbolic link there) points."""
    with reading(path, "ONNX model"):
        proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto.graph)):
        raise ToolkitError(f"{path}: refers to external data files; toolkit's artifacts are self-contained ONNX files")
    # an empty or truncated file parses as an empty model: every later step would fail inside onnx
    if not proto.opset_import or not proto.graph.node or not proto.graph.output:
        raise ToolkitError(f"{path}: not a usable ONNX model (no graph: empty or cut short); export it again")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ToolkitError(f"{path}: not a valid ONNX model ({first_line(exc)}); export it again") from None
    return proto


def _tensors(graph: onnx.GraphProto):
    """Every tensor of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def batch_reader(images, input_name: str, batch: int = 64):
    """ONNX Runtime's CalibrationDataReader over ``images`` (an array), ``batch`` at a time: what
    its calibration and its QDQ debugging tools read."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

        def get_next(self):
            nxt = next(self.batches, None)
            return None if nxt is None else {input_name: nxt}

    return Batches()


def tidy(proto: onnx.ModelProto) -> dict:
    """In place: drop the initializers no node reads (ONNX Runtime warns of each on every load) and
    the opset imports of domains no node uses (a quantizer imports nine); what was dropped."""
    graph = proto.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    used_domains = {node.domain or "" for node in graph.node} | {""}
    extra = [o for o in proto.opset_import if (o.domain or "") not in used_domains and o.domain != "ai.onnx"]
    for opset in extra:
        proto.opset_import.remove(opset)
    return {"initializers": [i.name for i in unused], "domains": [o.domain for o in extra]}
