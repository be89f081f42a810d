"""Zero-pad convolution channels to a multiple of ONNX Runtime's CPU block size.

ONNX Runtime's x86 CPU provider runs convolutions in a blocked channel layout (NCHWc, blocks
of 8 channels with AVX2 and 16 with AVX-512). A conv whose channel count is not a multiple of
the block falls back to plain kernels and reorders its tensors between layouts, which costs
more than the arithmetic in a small model at batch 1 (fine4 has 12, 10 and 8 channels).

``pad_conv_channels`` gives such convs extra output channels with zero weights and bias, and
gives every consumer of those channels zero weights for them, so each output is unchanged
(the padded channels only ever meet zero weights). A conv's channels are padded only when
every path from its output reaches a consumer whose weights can be padded, through ops that
act on each channel alone: another Conv, or Flatten/Reshape of a 1x1 map into a Gemm.
Anything else (a residual Add, a Concat, a graph output) leaves that conv as it is.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

# ops that act on each channel alone and map zeros to finite values (the padded channels
# stay finite, so the consumers' zero weights cancel them exactly)
PER_CHANNEL_OPS = frozenset({"Relu", "LeakyRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool"})


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    """What padding needs to know about a graph: its initializers, who reads each tensor, its
    outputs and inferred shapes."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                       for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        self.inits = {i.name: i for i in graph.initializer}
        self.uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            for index, name in enumerate(node.input):
                self.uses[name].append((node, index))
        self.outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def replace(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(self.array(name).dtype), name))

    def own_initializer(self, node: onnx.NodeProto, index: int, ndim: int) -> bool:
        """The input is an initializer of ``ndim`` dimensions that nothing else reads."""
        return (len(node.input) > index and node.input[index] in self.inits and len(self.uses[node.input[index]]) == 1
                and len(self.inits[node.input[index]].dims) == ndim)

    def plain_conv(self, node: onnx.NodeProto) -> bool:
        return (node.op_type == "Conv" and _attr(node, "group", 1) == 1 and self.own_initializer(node, 1, 4)
                and (len(node.input) < 3 or not node.input[2] or self.own_initializer(node, 2, 1)))

    def sinks_of(self, tensor: str) -> list[tuple[str, onnx.NodeProto, onnx.NodeProto | None]] | None:
        """Every weight reader reached from ``tensor`` through per-channel ops; None if any path
        ends elsewhere."""
        found, frontier, seen = [], [tensor], set()
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.outputs or not self.uses[t]:
                return None
            for node, index in self.uses[t]:
                if index != 0:
                    return None
                if node.op_type in PER_CHANNEL_OPS and all(not o for o in node.output[1:]):
                    frontier.append(node.output[0])
                elif self.plain_conv(node):
                    found.append(("conv", node, None))
                elif node.op_type in ("Flatten", "Reshape"):
                    gemms = self.flatten_to_gemms(node, t)
                    if gemms is None:
                        return None
                    found += [("gemm", gemm, node) for gemm in gemms]
                else:
                    return None
        return found

    def flatten_to_gemms(self, node: onnx.NodeProto, tensor: str) -> list[onnx.NodeProto] | None:
        shape = self.shapes.get(tensor)
        if shape is None or len(shape) != 4 or shape[2:] != [1, 1]:
            return None  # with a spatial map, channel c's features are not one Gemm column
        if node.op_type == "Flatten" and _attr(node, "axis", 1) != 1:
            return None
        if node.op_type == "Reshape" and not (self.own_initializer(node, 1, 1) and self.array(node.input[1]).tolist()[1:] == [shape[1]]):
            return None  # the target shape must be [batch, channels]
        gemms = []
        for user, index in self.uses[node.output[0]]:
            if not (user.op_type == "Gemm" and index == 0 and _attr(user, "transA", 0) == 0 and self.own_initializer(user, 1, 2)):
                return None
            gemms.append(user)
        return gemms if gemms and node.output[0] not in self.outputs else None

    def pad(self, conv: onnx.NodeProto, sinks, extra: int) -> None:
        """``extra`` zero output channels on ``conv``, and zero weights for them in every sink."""
        weight = self.array(conv.input[1])
        self.replace(conv.input[1], np.concatenate([weight, np.zeros((extra, *weight.shape[1:]), weight.dtype)]))
        if len(conv.input) > 2 and conv.input[2]:
            bias = self.array(conv.input[2])
            self.replace(conv.input[2], np.concatenate([bias, np.zeros(extra, bias.dtype)]))
        for kind, sink, flatten in sinks:
            w = self.array(sink.input[1])
            if kind == "conv":
                self.replace(sink.input[1], np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1))
                continue
            axis = 0 if _attr(sink, "transB", 0) == 0 else 1
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, extra)
            self.replace(sink.input[1], np.pad(w, pad))
            if flatten.op_type == "Reshape":
                self.replace(flatten.input[1], np.array([self.array(flatten.input[1])[0], weight.shape[0] + extra], dtype=np.int64))


def pad_conv_inputs(proto: onnx.ModelProto, multiple: int = 4) -> tuple[onnx.ModelProto, int]:
    """A copy of ``proto`` in which every plain conv whose input channels are not a multiple of
    ``multiple`` reads its input through a Pad that adds zero channels, with zero weights for them
    (each output unchanged), and how many convs were given one. Convs reading one tensor share
    one Pad. For ONNX Runtime's x86 integer convolutions, which take input channels in groups of 4
    bytes (the VNNI and AVX2 dot products): an image's 1 or 3 channels send the first conv to a
    slower general path (ResNet20's first conv, batch 32: 592 us with 3 channels, 247 us padded to
    4; docs/benchmarks.md). In a uint8 file the Pad runs on uint8 (``quantize.integer_pads``)."""
    if multiple < 1:
        raise ValueError("multiple must be at least 1")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = _Graph(model)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for conv in [n for n in model.graph.node if g.plain_conv(n)]:
        if g.array(conv.input[1]).shape[1] % multiple:
            readers[conv.input[0]].append(conv)
    padded = 0
    for tensor, convs in readers.items():
        channels = {g.array(c.input[1]).shape[1] for c in convs}
        if len(channels) != 1:
            continue  # one tensor, one channel count: never otherwise in a valid graph
        count = channels.pop()
        extra = math.ceil(count / multiple) * multiple - count
        name = f"{tensor}_channel_pad"
        pads = onnx.numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64), f"{name}_pads")
        model.graph.initializer.append(pads)
        nodes = list(model.graph.node)
        first = min(nodes.index(c) for c in convs)
        model.graph.node.insert(first, onnx.helper.make_node("Pad", [tensor, pads.name], [f"{name}_output"], name=name, mode="constant"))
        for conv in convs:
            w = g.array(conv.input[1])
            g.replace(conv.input[1], np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1))
            conv.input[0] = f"{name}_output"
            padded += 1
    if padded:
        del model.graph.value_info[:]
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, padded


def pad_conv_channels(proto: onnx.ModelProto, multiple: int = 16) -> tuple[onnx.ModelProto, int]:
    """A copy of ``proto`` with padded conv channels, and how many convs were padded."""
    if multiple < 1:
        raise ValueError("multiple must be at least 1")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = _Graph(model)
    padded = 0
    for conv in [n for n in model.graph.node if g.plain_conv(n)]:
        channels = g.array(conv.input[1]).shape[0]
        extra = math.ceil(channels / multiple) * multiple - channels
        sinks = g.sinks_of(conv.output[0]) if extra else None
        if sinks is None:
            continue
        g.pad(conv, sinks, extra)
        padded += 1
    if padded:
        del model.graph.value_info[:]  # inferred again with the new channel counts
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, padded
