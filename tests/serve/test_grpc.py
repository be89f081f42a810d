"""#44: the v2 API over gRPC, talked to by tritonclient.grpc as Triton's clients do: the same models, answers,
batches and errors as over HTTP (tritonclient.http on the same server)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, free_port, mnist_test_set

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the dev extra")


@pytest.fixture(scope="module")
def servers(serving_export):
    import tritonclient.http as httpclient

    from toolkit.serve.server import serve

    port, grpc_port = free_port(), free_port()
    running, _ = serve([serving_export], port=port, api_only=True, grpc_port=grpc_port, block=False, console=None)
    running.grpc_port = grpc_port
    yield grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"), httpclient.InferenceServerClient(f"127.0.0.1:{port}"), running
    running.close()


def _tensor_input(x: np.ndarray, module=grpcclient):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _digits(mnist_root, serving_export, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from toolkit.core.manifest import Manifest
    from toolkit.inference import preprocess

    images, labels = mnist_test_set(mnist_root)
    return images[:n], labels[:n], preprocess.model_input(images[:n, None], Manifest.load(serving_export))


def test_metadata_readiness_and_config_as_over_http(servers):
    grpc, http, _ = servers
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.get_server_metadata().name == "toolkit" and "classification" in grpc.get_server_metadata().extensions
    for name in ("fine4_fp32", "fine4_int8"):
        assert grpc.is_model_ready(name)
        meta, theirs = grpc.get_model_metadata(name, as_json=True), http.get_model_metadata(name)
        assert meta["name"] == theirs["name"] and meta["platform"] == theirs["platform"]
        assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == \
            [(i["name"], i["datatype"], i["shape"]) for i in theirs["inputs"]]
        assert grpc.get_model_config(name).config.max_batch_size == http.get_model_config(name)["max_batch_size"]
    assert not grpc.is_model_ready("nope")


def test_infer_on_tensors_and_png_files_gives_the_http_answers(servers, mnist_root, serving_export):
    import tritonclient.http as httpclient

    from toolkit.inference import preprocess

    grpc, http, _ = servers
    images, labels, x = _digits(mnist_root, serving_export)
    ours = grpc.infer("fine4_fp32", [_tensor_input(x)]).as_numpy("logits")
    theirs = http.infer("fine4_fp32", [_tensor_input(x, httpclient)]).as_numpy("logits")
    assert np.array_equal(ours, theirs) and (ours.argmax(1) == labels).mean() >= 0.75
    files = grpcclient.InferInput("image", [len(images)], "BYTES")
    files.set_data_from_numpy(np.array([preprocess.png_bytes(img[None]) for img in images], dtype=np.object_))
    assert np.array_equal(grpc.infer("fine4_fp32", [files]).as_numpy("logits"), ours)  # a PNG of a test digit is that digit
    top = grpc.infer("fine4_fp32", [_tensor_input(x)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    http_top = http.infer("fine4_fp32", [_tensor_input(x, httpclient)],
                          outputs=[httpclient.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    assert top.shape == (len(x), 3) and (top == http_top).all()
    assert [int(t.split(b":")[1]) for t in top[:, 0]] == list(ours.argmax(1))


@pytest.mark.parametrize("case, status", [
    ("unknown model", "NOT_FOUND"),
    ("wrong shape", "INVALID_ARGUMENT"),
    ("wrong datatype", "INVALID_ARGUMENT"),
    ("over the max batch", "INVALID_ARGUMENT"),
    ("not an image", "INVALID_ARGUMENT"),
    ("over the message limit", "RESOURCE_EXHAUSTED"),
])
def test_errors_are_grpc_statuses_with_the_http_message(servers, case, status):
    from tritonclient.utils import InferenceServerException

    grpc, _, running = servers
    model, inputs = "fine4_fp32", None
    if case == "unknown model":
        model, inputs = "nope", [_tensor_input(np.zeros((1, 1, 28, 28), np.float32))]
    elif case == "wrong shape":
        inputs = [_tensor_input(np.zeros((1, 1, 28, 27), np.float32))]
    elif case == "wrong datatype":
        t = grpcclient.InferInput("input", [1, 1, 28, 28], "FP64")
        t.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float64))
        inputs = [t]
    elif case == "over the max batch":
        inputs = [_tensor_input(np.zeros((257, 1, 28, 28), np.float32))]
    elif case == "not an image":
        t = grpcclient.InferInput("image", [1], "BYTES")
        t.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        inputs = [t]
    else:
        inputs = [_tensor_input(np.zeros((running.service.max_body // 3136 + 1, 1, 28, 28), np.float32))]
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer(model, inputs)
    assert caught.value.status() == f"StatusCode.{status}", caught.value
    assert grpc.is_server_ready()


def test_a_seeded_fuzz_never_breaks_the_server(servers, serving_export, mnist_root):
    """Malformed requests straight on the wire (shapes, datatypes, raw contents of the wrong size, random
    bytes, several inputs): every one answered with a status, and the server answers a good request after each."""
    import grpc as grpclib
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

    client, _, running = servers
    _, _, x = _digits(mnist_root, serving_export, 1)
    channel = grpclib.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(44)
    datatypes = ["FP32", "UINT8", "BYTES", "FP64", "INT8", "", "fp32", "BOOL"]
    codes = set()
    for _ in range(150):
        request = pb.ModelInferRequest(model_name=str(rng.choice(["fine4_fp32", "fine4_int8", "", "x" * 300])))
        for _ in range(int(rng.integers(0, 3))):
            shape = [int(d) for d in rng.integers(-2, 40, int(rng.integers(0, 6)))]
            request.inputs.add(name=str(rng.choice(["input", "image", "", "logits"])), datatype=str(rng.choice(datatypes)), shape=shape)
            if rng.random() < 0.7:
                request.raw_input_contents.append(rng.bytes(int(rng.integers(0, 5000))))
        if rng.random() < 0.3:
            request.outputs.add(name=str(rng.choice(["logits", "other"])))
            request.outputs[0].parameters["classification"].int64_param = int(rng.integers(-3, 20))
        try:
            stub.ModelInfer(request, timeout=30)
            codes.add("OK")
        except grpclib.RpcError as exc:
            codes.add(exc.code().name)
            assert exc.code() in (grpclib.StatusCode.INVALID_ARGUMENT, grpclib.StatusCode.NOT_FOUND), (exc.code(), exc.details())
    assert client.infer("fine4_fp32", [_tensor_input(x)]).as_numpy("logits").shape == (1, 10)
    assert "INVALID_ARGUMENT" in codes and "NOT_FOUND" in codes
    channel.close()


def test_a_client_that_cancels_mid_call_leaves_the_server_answering(servers, serving_export, mnist_root):
    client, _, running = servers
    _, _, x = _digits(mnist_root, serving_export, 8)
    big = np.repeat(x, 32, axis=0)  # 256 images: a call long enough to cancel
    done = []
    for _ in range(10):
        call = client.async_infer("fine4_fp32", [_tensor_input(big)], callback=lambda result, error: done.append(error))
        call.cancel()
    time.sleep(0.5)
    assert client.infer("fine4_fp32", [_tensor_input(x)]).as_numpy("logits").shape == (8, 10)
    assert client.is_server_ready()


def test_sigterm_drains_the_grpc_calls_under_way_then_exits_0(serving_export, mnist_root):
    """`toolkit serve --api-only` opens gRPC on its own (Triton's 8001 by default; here a free port); on SIGTERM
    the calls under way are answered, new ones are refused, and the process exits 0."""
    port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", str(serving_export), "--api-only", "--port", str(port),
                               "--grpc-port", str(grpc_port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = io.StringIO()
        while "ready" not in said.getvalue():
            line = server.stdout.readline()
            assert line or server.poll() is None, said.getvalue()
            said.write(line)
        assert f"gRPC: 127.0.0.1:{grpc_port}" in said.getvalue()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        _, _, x = _digits(mnist_root, serving_export, 8)
        answers = []
        calls = [client.async_infer("fine4_fp32", [_tensor_input(np.repeat(x, 32, axis=0))], callback=lambda result, error: answers.append(error))
                 for _ in range(20)]  # kept: a call whose handle is collected is cancelled by the client
        time.sleep(0.05)  # on the wire, some answered, some under way
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while len(answers) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == 20  # every call got an answer: its logits, or UNAVAILABLE if it came after the stop
        assert any(error is None for error in answers), [str(e)[:80] for e in answers]
        assert all(error is None or "UNAVAILABLE" in str(error.status()) for error in answers), [str(e)[:80] for e in answers]
        assert len(calls) == 20
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)


def test_serve_help_names_the_grpc_port():
    from tests.helpers import run_cli

    proc = run_cli("serve", "--help")
    assert "--grpc-port" in proc.stdout and "8001" in proc.stdout


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_workers_share_the_ports_and_stop_with_the_first_process(serving_export, mnist_root):
    """#44: `--workers 2`: a second server process on the same HTTP and gRPC ports; connections are spread over
    both (each process's CPU time grows under 400 fresh connections), answers are the model's, SIGTERM to the
    first stops both with exit 0."""
    import tritonclient.http as httpclient

    port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", str(serving_export), "--api-only", "--workers", "2",
                               "--port", str(port), "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        while not said or not said[-1].startswith("ready:"):
            said.append(server.stdout.readline())
            assert said[-1] or server.poll() is None, "".join(said)
        assert any(line.startswith("worker 2/2: ready:") for line in said), said
        (worker,) = _children(server.pid)
        before = {pid: _cpu_ticks(pid) for pid in (server.pid, worker)}
        _, labels, x = _digits(mnist_root, serving_export, n=4)
        for i in range(400):  # a new client each time: a new connection, placed by the kernel
            client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            out = client.infer("fine4_fp32", [_tensor_input(x[i % 4:i % 4 + 1], httpclient)]).as_numpy("logits")
            client.close()
            assert out.shape == (1, 10)
        grown = {pid: _cpu_ticks(pid) - ticks for pid, ticks in before.items()}
        assert all(t >= 3 for t in grown.values()), grown  # both processes answered requests
        assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_ready()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        rest = server.stdout.read()
        assert "worker 2/2: stopped" in rest and rest.rstrip().endswith("stopped"), rest
        time.sleep(0.5)
        with pytest.raises(FileNotFoundError):
            open(f"/proc/{worker}/stat").read()
    finally:
        if server.poll() is None:
            server.kill()


def test_workers_need_the_api_only_server(serving_export):
    from tests.helpers import one_line_error, run_cli

    proc = run_cli("serve", str(serving_export), "--workers", "2", "--port", str(free_port()))
    assert proc.returncode == 2 and "--workers needs --api-only" in one_line_error(proc)
