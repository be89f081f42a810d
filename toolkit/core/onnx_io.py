"""Reading ONNX files toolkit made: self-contained, parsed at the one boundary for user files.

Layer 2 (below the export and quantize stages, which both read ONNX files). Needs the ``onnx``
package, which the torch-free serving install does not have: serving hands files to ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import reading


def load_onnx(path: Path, check: bool = True) -> onnx.ModelProto:
    """An ONNX file toolkit reads (its own artifacts): self-contained, or a one-line error. External
    data would be read from wherever its ``location`` (or a symbolic link there) points. ``check``:
    ONNX's checker too (off where another parser is the judge: TensorRT's builder says what it refuses)."""
    with reading(path, "ONNX model"):
        proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto.graph)):
        raise ToolkitError(f"{path}: refers to external data files; toolkit's artifacts are self-contained ONNX files")
    # an empty or truncated file parses as an empty model: every later step would fail inside onnx
    if not proto.opset_import or not proto.graph.node or not proto.graph.output:
        raise ToolkitError(f"{path}: not a usable ONNX model (no graph: empty or cut short); export it again")
    try:
        if check:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ToolkitError(f"{path}: not a valid ONNX model ({first_line(exc)}); export it again") from None
    return proto


# the operator domains of the graphs toolkit makes and the runtimes it targets run: ONNX's own, and
# ONNX Runtime's kernels; an operator of any other domain is a graph toolkit did not make
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")
_DTYPES = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}


def graph_problem(proto: onnx.ModelProto, input_spec, classes: int) -> str | None:
    """Why a parsed graph is not one an export of this manifest holds, or None: an operator of a
    foreign domain, an input other than the manifest's one (element type and fixed sides), or
    outputs other than one score per class."""
    foreign = next((n for n in _nodes(proto.graph) if (n.domain or "") not in KNOWN_DOMAINS), None)
    if foreign is not None:
        return (f"node {foreign.name or foreign.op_type} is the operator {foreign.domain}::{foreign.op_type}, of a domain "
                f"toolkit does not make (known: ai.onnx, com.microsoft)")
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        return f"it takes {len(inputs)} inputs, not the one image batch its manifest describes"
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    want = list(input_spec.shape[1:])
    if tensor.elem_type != _DTYPES[input_spec.dtype] or len(dims) != 1 + len(want) or \
            any(d is not None and d != w for d, w in zip(dims[1:], want)):
        shown_dims = ["batch" if d is None else d for d in dims]
        return f"its input is {onnx.TensorProto.DataType.Name(tensor.elem_type).lower()} {shown_dims}, not the manifest's {input_spec.dtype} {input_spec.shape}"
    shapes = [[d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim] for o in graph.output]
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][-1] not in (None, classes):
        return f"its outputs {shapes} are not one score per class for its manifest's {classes} classes"
    return None


def load_checked(path: Path, input_spec, classes: int, shown_as: Path | None = None) -> onnx.ModelProto:
    """An ONNX file read from disk is untrusted until this passes: parsed and valid (``load_onnx``),
    and the graph an export of this manifest holds (``graph_problem``); else one ToolkitError line
    naming the file (as ``shown_as``: the export's path of a file read from its staging copy)."""
    try:
        proto = load_onnx(path)
    except ToolkitError as exc:
        raise ToolkitError(str(exc).replace(str(path), str(shown_as or path), 1)) from None
    problem = graph_problem(proto, input_spec, classes)
    if problem:
        raise ToolkitError(f"{shown_as or path}: {problem}; export it again")
    return proto


def check_artifacts(export_dir: Path, manifest) -> None:
    """Every ONNX artifact of an export checked as ``load_checked`` does, before a reader runs any."""
    for art in manifest.artifacts:
        if art.format == "onnx":
            load_checked(manifest.path(export_dir, art), manifest.input, len(manifest.classes))


def _nodes(graph: onnx.GraphProto):
    """Every node of a graph, subgraphs included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


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
