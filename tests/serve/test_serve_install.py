"""The inference images without Docker: each Dockerfile target's own install line, entry command
and health check, run in a fresh virtual environment laid out like the image's /app (quicker than
tests/serve/test_docker.py, which builds the images, and runs where no Docker engine does).

The demo install has no torch and answers gradio_client on 100 real MNIST test digits; the api
install has neither torch nor Gradio and answers tritonclient.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, demo_correct_on_digits, free_port, v2_correct_on_digits

pytestmark = pytest.mark.slow


def parse_dockerfile(path: Path, target: str | None = None) -> dict:
    """ARG defaults, ENV, COPY, RUN, USER, HEALTHCHECK and CMD of one target of a Dockerfile (default:
    the last, as `docker build` picks), with what it inherits from the stages it is built FROM."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continuation lines
    stages: dict[str, dict] = {}
    global_args: dict[str, str] = {}
    spec = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            image, _, name = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE).group(1, 0, 2)
            parent = stages.get(image)
            spec = json.loads(json.dumps(parent)) if parent else {"args": dict(global_args), "env": {}, "copies": [], "runs": [],
                                                                   "user": None, "healthcheck": None, "cmd": None}
            spec["from"] = image
            stages[name or f"stage{len(stages)}"] = spec
        elif op == "ARG":
            name, _, default = rest.partition("=")
            (spec["args"] if spec is not None else global_args)[name] = default
        elif op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                spec["env"][key] = value
        elif op == "COPY":
            *sources, dest = rest.split()
            if sources[0].startswith("--from="):  # a stage's whole file system: what it ran and set comes with it
                stage = stages[sources[0].split("=", 1)[1]]
                for key in ("args", "env"):
                    spec[key] = {**stage[key], **spec[key]}
                spec["copies"] = stage["copies"] + spec["copies"]
                spec["runs"] = stage["runs"] + spec["runs"]
                spec["user"] = spec["user"] or stage["user"]
                continue
            spec["copies"].append((sources, dest))
        elif op == "RUN":
            spec["runs"].append(rest)  # kept verbatim: the shell expands $GPU from the environment
        elif op == "USER":
            spec["user"] = rest
        elif op == "HEALTHCHECK":
            spec["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:])
        elif op == "CMD":
            spec["cmd"] = json.loads(rest)
    chosen = stages[target] if target else list(stages.values())[-1]
    chosen["stages"] = list(stages)
    return chosen


def test_dockerfile_has_what_the_image_needs():
    spec = parse_dockerfile(REPO / "Dockerfile")
    api = parse_dockerfile(REPO / "Dockerfile", "api")
    text = (REPO / "Dockerfile").read_text()
    assert spec["stages"][-1] == "demo"  # a plain `docker build .` makes the demo image
    assert re.search(r"^FROM \$\{BASE\}", text, re.M) and spec["args"]["BASE"].endswith("-slim")
    for target in (spec, api):
        assert target["user"] not in (None, "root", "0") and target["env"]["TOOLKIT_HOST"] == "0.0.0.0"
        assert (["exports/"], "exports/") in target["copies"] and "/v2/health/ready" in " ".join(target["healthcheck"])
    assert re.search(r"^EXPOSE 7860$", text, re.M)
    assert spec["cmd"] == ["toolkit", "serve", "exports"] and api["cmd"] == ["toolkit", "serve", "--api-only", "exports"]
    assert any(re.search(r'pip install (--\S+ )*"\.\[serve\]"', r) for r in spec["runs"]) and "GPU" in spec["args"]
    assert any(re.search(r'pip install (--\S+ )*"\.\[api\]"', r) for r in api["runs"]) and not any("[serve]" in r for r in api["runs"])
    # #44: each image is one trimmed layer on an empty image (multi-stage), so nothing deleted lies underneath
    for name in ("api", "demo"):
        assert re.search(rf"^FROM scratch AS {name}$", text, re.M) and re.search(rf"^COPY --from={name}-build / /$", text, re.M)
        assert any("toolkit-trim" in r for r in parse_dockerfile(REPO / "Dockerfile", name)["runs"])
    # no "# syntax=" line: under BuildKit it pulls a frontend image from Docker Hub, and nothing needs it
    assert not re.search(r"^#\s*syntax=", text, re.M)
    # examples publish the port on this machine only
    assert "-p 7860:7860" not in text and "-p 127.0.0.1:7860:7860" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs", "data", ".git", "**/__pycache__"} <= set(ignored)


def _install(target: str, tmp_path_factory, serving_export):
    """/app as the target's image lays it out, and a fresh virtual environment with its install line."""
    spec = parse_dockerfile(REPO / "Dockerfile", target)
    app = tmp_path_factory.mktemp(f"image-{target}") / "app"
    app.mkdir()
    for sources, dest in spec["copies"]:
        if dest.startswith("/"):  # outside /app (the trim script): the image's business, not the install's
            continue
        for src in sources:
            if src == "exports/":  # the image gets whatever exports/ holds: here, one fine4 export
                shutil.copytree(serving_export, app / dest / serving_export.name)
            elif (REPO / src).is_dir():
                shutil.copytree(REPO / src, app / dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / src, app / dest)
    venv = app.parent / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, **spec["env"], **spec["args"], "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PIP_NO_CACHE_DIR", None)  # the image saves space; the test may reuse pip's cache
    env.pop("PYTHONPATH", None)
    install = [r for r in spec["runs"] if "pip install" in r]
    assert len(install) == 1
    done = subprocess.run(["bash", "-c", install[0]], cwd=app, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return app, venv, env, spec


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory, serving_export):
    return _install("demo", tmp_path_factory, serving_export)


@pytest.fixture(scope="module")
def api_venv(tmp_path_factory, serving_export):
    return _install("api", tmp_path_factory, serving_export)


def _site_packages_mib(venv: Path) -> float:
    return sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def _start(spec, app, env, port, tmp_path):
    """The target's entry command, waited for until its health check passes."""
    run_env = {**env, "TOOLKIT_PORT": str(port), "HOME": str(tmp_path)}
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    server = subprocess.Popen(spec["cmd"], cwd=app, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        health = subprocess.run(spec["healthcheck"], cwd=app, env=run_env, capture_output=True, timeout=30)
        if health.returncode == 0:
            return server, log, run_env
        assert server.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the health check never passed: " + log_path.read_text()[-3000:]
        time.sleep(1)


def _stop(server, log) -> float:
    """SIGTERM, as `docker stop` sends it: seconds until the server exited, which it must do cleanly."""
    t0 = time.monotonic()
    server.terminate()
    code = server.wait(timeout=30)
    log.close()
    assert code == 0, f"exit status {code} after SIGTERM"
    return time.monotonic() - t0


def test_inference_install_has_no_torch(image_venv):
    app, venv, env, _ = image_venv
    # the install line leaves no build debris in /app
    assert not (app / "build").exists() and not list(app.glob("*.egg-info"))
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import torch"], cwd=app, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    ok = subprocess.run([python, "-c", "import toolkit.serve.server, toolkit.serve.demo, onnxruntime, gradio, PIL, sys; "
                         "assert 'torch' not in sys.modules; print(toolkit.serve.server.__file__)"], cwd="/", env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert str(venv) in ok.stdout  # the installed copy, not the checkout
    train = subprocess.run([str(venv / "bin" / "toolkit"), "train", "fine4"], cwd=app, env=env, capture_output=True, text=True)
    assert train.returncode == 2 and "pip install '.[train]'" in train.stderr and "Traceback" not in train.stderr


def test_image_entry_command_serves_100_real_digits(image_venv, mnist_root, tmp_path):
    app, venv, env, spec = image_venv
    # the image's environment, with the port moved off 7860 so parallel runs cannot clash
    port = free_port()
    server, log, _ = _start(spec, app, {**env, "TOOLKIT_DATA_DIR": str(mnist_root)}, port, tmp_path)
    try:
        correct = demo_correct_on_digits(f"http://127.0.0.1:{port}/", mnist_root, tmp_path, seed=2026)
        assert correct >= 98, f"{correct}/100"
    finally:
        if server.poll() is None:
            seconds = _stop(server, log)
            print(f"demo entry command stopped {seconds:.2f} s after SIGTERM")


def test_api_install_has_neither_torch_nor_gradio_and_is_smaller(api_venv, image_venv):
    app, venv, env, _ = api_venv
    assert not (app / "build").exists() and not list(app.glob("*.egg-info"))
    python = str(venv / "bin" / "python")
    for module in ("torch", "gradio"):
        probe = subprocess.run([python, "-c", f"import {module}"], cwd=app, env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and f"No module named '{module}'" in probe.stderr
    ok = subprocess.run([python, "-c", "import toolkit.serve.server, toolkit.serve.oip, onnxruntime, starlette, uvicorn, PIL, sys; "
                         "assert 'torch' not in sys.modules and 'gradio' not in sys.modules"], cwd="/", env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # the demo needs the serve extra, and says so in one line
    demo = subprocess.run([str(venv / "bin" / "toolkit"), "serve", "exports", "--port", str(free_port())], cwd=app, env=env,
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2 and "pip install '.[serve]'" in demo.stderr and "Traceback" not in demo.stderr
    api_mib, demo_mib = _site_packages_mib(venv), _site_packages_mib(image_venv[1])
    print(f"installed: api {api_mib:.0f} MiB, demo {demo_mib:.0f} MiB")
    # measured 2026-11-24: api 220 MiB, demo 410 MiB (ONNX Runtime and NumPy are most of the api's);
    # the aim of half or less is not met (README); the api install must stay the smaller
    assert api_mib < demo_mib, (api_mib, demo_mib)


def test_api_entry_command_answers_tritonclient_on_100_real_digits(api_venv, mnist_root, serving_export, tmp_path):
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (it is in the dev extra)")
    app, venv, env, spec = api_venv
    port = free_port()
    server, log, _ = _start(spec, app, env, port, tmp_path)
    try:  # the same answers as the export in this process (checked inside), and mostly right
        assert v2_correct_on_digits(port, mnist_root, serving_export, seed=2027) >= 95
    finally:
        seconds = _stop(server, log)
        print(f"api entry command stopped {seconds:.2f} s after SIGTERM")
