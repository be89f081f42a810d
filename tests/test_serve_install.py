"""The inference image without Docker: the Dockerfile's own install line, entry command and health
check, run in a fresh virtual environment laid out like the image's /app.

No Docker engine runs here, so the image itself is never built; what it would run is. The test
asserts that the install has no torch, then answers gradio_client on 100 real MNIST test digits.
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

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, free_port, mnist_test_set

pytestmark = pytest.mark.slow


def parse_dockerfile(path: Path) -> dict:
    """ARG defaults, ENV, COPY, RUN, HEALTHCHECK and CMD of a single-stage Dockerfile."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continuation lines
    args, env, copies, runs, health, cmd = {}, {}, [], [], None, None

    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif op == "COPY":
            *sources, dest = rest.split()
            copies.append((sources, dest))
        elif op == "RUN":
            runs.append(rest)  # kept verbatim: the shell expands $GPU from the environment
        elif op == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3:])
        elif op == "CMD":
            cmd = json.loads(rest)
    return {"args": args, "env": env, "copies": copies, "runs": runs, "healthcheck": health, "cmd": cmd}


def test_dockerfile_has_what_the_image_needs():
    spec = parse_dockerfile(REPO / "Dockerfile")
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE\}", text, re.M) and spec["args"]["BASE"].endswith("-slim")
    assert re.search(r"^USER (?!root)\w+", text, re.M) and re.search(r"^EXPOSE 7860$", text, re.M)
    assert spec["env"]["TOOLKIT_HOST"] == "0.0.0.0" and spec["cmd"][:2] == ["toolkit", "serve"]
    assert any('pip install ".[serve]"' in r for r in spec["runs"]) and "GPU" in spec["args"]
    assert (["exports/"], "exports/") in spec["copies"]
    # no "# syntax=" line: under BuildKit it pulls a frontend image from Docker Hub, and nothing needs it
    assert not re.search(r"^#\s*syntax=", text, re.M)
    # examples publish the port on this machine only
    assert "-p 7860:7860" not in text and "-p 127.0.0.1:7860:7860" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs", "data", ".git", "**/__pycache__"} <= set(ignored)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory, serving_export):
    """/app as the image lays it out, and a fresh virtual environment with the Dockerfile's install."""
    spec = parse_dockerfile(REPO / "Dockerfile")
    app = tmp_path_factory.mktemp("image") / "app"
    app.mkdir()
    for sources, dest in spec["copies"]:
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


def test_inference_install_has_no_torch(image_venv):
    app, venv, env, _ = image_venv
    # the install line leaves no build debris in /app
    assert not (app / "build").exists() and not list(app.glob("*.egg-info"))
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import torch"], cwd=app, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    ok = subprocess.run([python, "-c", "import toolkit.serve, toolkit.demo.app, onnxruntime, gradio, PIL, sys; "
                         "assert 'torch' not in sys.modules; print(toolkit.serve.__file__)"], cwd="/", env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert str(venv) in ok.stdout  # the installed copy, not the checkout
    train = subprocess.run([str(venv / "bin" / "toolkit"), "train", "fine4"], cwd=app, env=env, capture_output=True, text=True)
    assert train.returncode == 2 and "pip install 'toolkit[train]'" in train.stderr and "Traceback" not in train.stderr


def test_image_entry_command_serves_100_real_digits(image_venv, mnist_root, tmp_path):
    from gradio_client import Client, handle_file

    app, venv, env, spec = image_venv
    port = free_port()
    # the image's environment, with the port moved off 7860 so parallel runs cannot clash
    run_env = {**env, "TOOLKIT_PORT": str(port), "TOOLKIT_DATA_DIR": str(mnist_root), "HOME": str(tmp_path)}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(spec["cmd"], cwd=app, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            health = subprocess.run(spec["healthcheck"], cwd=app, env=run_env, capture_output=True, timeout=30)
            if health.returncode == 0:
                break
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the health check never passed: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        images, labels = mnist_test_set(mnist_root)
        pick = np.random.default_rng(2026).choice(len(images), size=100, replace=False)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        correct = 0
        for i in pick:
            path = tmp_path / f"{i}.png"
            Image.fromarray(images[i]).save(path)
            correct += client.predict(handle_file(str(path)), api_name="/predict")["label"] == str(labels[i])
        assert correct >= 98, f"{correct}/100"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
