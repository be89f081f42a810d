"""`toolkit export`: the export stage. ``export`` (the plan, ``toolkit.export.plan``) makes artifacts from a
trained run; each format has its builder module beside it: to_onnx, pad_channels, quantize (int8) and qat,
to_trt (TensorRT engines), to_triton (a Triton model repository)."""

from toolkit.export.plan import FORMATS, PRECISIONS, export

__all__ = ["FORMATS", "PRECISIONS", "export"]
