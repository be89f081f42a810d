"""The v2 inference protocol over gRPC (``inference.GRPCInferenceService``), beside the HTTP one and answered by
the same ``oip.Service``: the same models, names, metadata, batches (one batcher per model, shared with HTTP),
pixel budget and errors. Tensors come in ``raw_input_contents`` or the typed ``contents`` fields (FP32, UINT8,
and BYTES for encoded image files); logits go out in ``raw_output_contents``; the classification extension
as over HTTP (an output parameter ``classification``).

The message and service code is tritonclient's (``tritonclient.grpc.service_pb2``, generated from Triton's
``grpc_service.proto``): the KServe v2 protocol's RPCs and messages with the same field numbers, plus Triton's
extensions, of which ``ModelConfig`` is answered too (what tritonclient's ``get_model_config`` calls). Nothing
is generated at install. The server runs on its own event loop thread (``GrpcServer``).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from toolkit import __version__
from toolkit.core.errors import ToolkitError, first_line
from toolkit.serve.oip import EXTENSIONS, Model, ProtocolError, Service, _serialize_bytes

STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}
CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}
STOP_GRACE_S = 3.0


def _parameter(p):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def request_form(request) -> tuple[dict, bytes]:
    """A ModelInferRequest in the protocol's JSON form and its binary data, as ``oip.read_inputs`` reads them."""
    inputs, blob = [], b""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, tensor in enumerate(request.inputs):
        form = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                "parameters": {k: _parameter(v) for k, v in tensor.parameters.items()}}
        if raw:
            blob = raw[i]
            form["parameters"]["binary_data_size"] = len(blob)
        elif tensor.datatype == "BYTES":
            blob = _serialize_bytes(list(tensor.contents.bytes_contents))
            form["parameters"]["binary_data_size"] = len(blob)
        elif tensor.datatype in CONTENTS:
            form["data"] = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
        else:
            form["data"] = None  # a datatype this server does not take: read_inputs names it
        inputs.append(form)
    outputs = [{"name": o.name, "parameters": {k: _parameter(v) for k, v in o.parameters.items()}} for o in request.outputs]
    form = {"inputs": inputs, **({"outputs": outputs} if outputs else {}), **({"id": request.id} if request.id else {})}
    return form, blob


def _response(pb, model: Model, request_id: str, logits: np.ndarray, wanted) -> object:
    answer = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request_id)
    for out in wanted:
        if out.class_count:  # "score:index:label" per row, best first, as over HTTP
            order = np.argsort(-logits, axis=1, kind="stable")[:, :out.class_count]
            values = [f"{logits[r, i]:f}:{i}:{model.classes[i]}".encode() for r in range(len(logits)) for i in order[r]]
            answer.outputs.add(name=out.name, datatype="BYTES", shape=[len(logits), out.class_count])
            answer.raw_output_contents.append(_serialize_bytes(values))
        else:
            data = np.ascontiguousarray(logits, dtype=np.float32)
            answer.outputs.add(name=out.name, datatype="FP32", shape=list(data.shape))
            answer.raw_output_contents.append(data.tobytes())
    return answer


def servicer(service: Service, stopping: threading.Event):
    """The GRPCInferenceService implementation over ``service``."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2 as pb, service_pb2_grpc

    async def refuse(context, exc: ProtocolError):
        await context.abort(getattr(grpc.StatusCode, STATUS.get(exc.status, "INTERNAL")), str(exc))

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=bool(service.models) and not stopping.is_set())

        async def ServerMetadata(self, request, context):
            return pb.ServerMetadataResponse(name="toolkit", version=__version__, extensions=EXTENSIONS)

        async def ModelReady(self, request, context):
            ready = request.name in service.models and request.version in ("", "1") and not stopping.is_set()
            return pb.ModelReadyResponse(ready=ready)

        async def ModelMetadata(self, request, context):
            try:
                model = service.model(request.name, request.version)
            except ProtocolError as exc:
                await refuse(context, exc)
            return json_format.ParseDict(model.metadata(), pb.ModelMetadataResponse())

        async def ModelConfig(self, request, context):
            try:
                model = service.model(request.name, request.version)
            except ProtocolError as exc:
                await refuse(context, exc)
            config = json_format.ParseDict(model.config(), model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=config)

        async def ModelInfer(self, request, context):
            if stopping.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
            try:
                model = service.model(request.model_name, request.model_version)
                form, blob = request_form(request)
                logits, wanted = await service.logits(model, form, blob)
            except ProtocolError as exc:
                await refuse(context, exc)
            return _response(pb, model, request.id, logits, wanted)

    return Servicer()


class GrpcServer:
    """grpc.aio's server on a thread of its own (its own event loop), over the HTTP API's ``Service``."""

    def __init__(self, service: Service, host: str, port: int, reuse_port: bool = False) -> None:
        import grpc

        self.stopping = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="toolkit-grpc", daemon=True)
        self.thread.start()
        options = [("grpc.max_receive_message_length", service.max_body), ("grpc.max_send_message_length", service.max_body),
                   ("grpc.so_reuseport", 1 if reuse_port else 0)]  # 1: with the other processes of --workers

        async def start():
            from tritonclient.grpc import service_pb2_grpc

            server = grpc.aio.server(options=options)
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(service, self.stopping), server)
            bound = server.add_insecure_port(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
            if not bound:
                raise ToolkitError(f"cannot listen on {host}:{port} for gRPC (in use?)")
            await server.start()
            return server

        try:
            self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - grpc's errors, in one line
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise exc if isinstance(exc, ToolkitError) else ToolkitError(f"cannot start the gRPC server on {host}:{port}: {first_line(exc)}") from None

    def close(self) -> None:
        """Stop taking calls (UNAVAILABLE), let those under way finish for up to ``STOP_GRACE_S``. Its loop runs on
        (a model's batcher may live in it) until ``end``."""
        self.stopping.set()
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(STOP_GRACE_S), self.loop).result(timeout=STOP_GRACE_S + 5)
        except Exception:  # noqa: BLE001 - stopping what may be half stopped
            pass

    def end(self) -> None:
        """The loop's end, once the service's batchers have stopped their tasks in it."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()
