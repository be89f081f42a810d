# Two inference images from one file, both torch-free, serving the contents of exports/ as a
# non-root user on all interfaces of the container:
#
#   demo (the default target): the serve extra (ONNX Runtime, NumPy, Pillow, Gradio); `toolkit serve`:
#         the Gradio demo on / and the v2 inference API (KServe v2, tritonclient) on /v2
#         docker build -t toolkit-demo . && docker run --rm -p 127.0.0.1:7860:7860 toolkit-demo
#   api:  the api extra (ONNX Runtime, NumPy, Pillow, Starlette, uvicorn; no Gradio); `toolkit serve
#         --api-only`: the v2 inference API alone, for programs
#         docker build --target api -t toolkit-api . && docker run --rm -p 127.0.0.1:7860:7860 toolkit-api
#   GPU (TensorRT + ONNX Runtime CUDA; base image with CUDA and Python 3.10+):
#         docker build --build-arg BASE=nvcr.io/nvidia/tensorrt:24.12-py3 --build-arg GPU=1 --target demo-gpu -t toolkit-demo:gpu .
#         docker run --rm --gpus all -p 127.0.0.1:7860:7860 toolkit-demo:gpu
#
# Where Docker Hub is out of reach, make the base locally and pass it as BASE:
#         docker/build-local-base.sh toolkit-base:local && docker build --build-arg BASE=toolkit-base:local ...
# Each image is one layer: the extra installed on BASE, trimmed by docker/trim.sh (no pip, tests, byte code,
# docs, apt or perl; libraries stripped), then copied onto an empty image (multi-stage: what was deleted is not
# underneath). tests/serve/test_docker.py builds and runs both targets (CI does, with that base); tests/serve/test_serve_install.py
# runs each target's install line, entry command and health check outside Docker.
ARG BASE=python:3.11-slim

FROM ${BASE} AS source
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    TOOLKIT_HOST=0.0.0.0 \
    TOOLKIT_PORT=7860
WORKDIR /app
COPY pyproject.toml README.md ./
COPY toolkit/ toolkit/
COPY docker/trim.sh /usr/local/sbin/toolkit-trim

RUN useradd --create-home --uid 10001 toolkit

# the lean API image: no Gradio (the build leaves build/ and an .egg-info folder in /app: removed in the same layer)
FROM source AS api-build
RUN pip install --no-compile ".[api]" && rm -rf build ./*.egg-info toolkit pyproject.toml README.md
RUN toolkit-trim && rm /usr/local/sbin/toolkit-trim

FROM scratch AS api
COPY --from=api-build / /
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOOLKIT_HOST=0.0.0.0 \
    TOOLKIT_PORT=7860
WORKDIR /app
COPY exports/ exports/
USER toolkit
EXPOSE 7860 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOOLKIT_PORT', '7860') + '/v2/health/ready', timeout=4)"]
CMD ["toolkit", "serve", "--api-only", "exports"]

# the demo image (default: the last target); GPU=1 swaps ONNX Runtime for its CUDA build and adds
# TensorRT with cuda-python (the trt extra)
FROM source AS demo-build
ARG GPU=0
RUN pip install --no-compile ".[serve]" && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime && pip install --no-compile ".[trt]"; fi \
    && rm -rf build ./*.egg-info toolkit pyproject.toml README.md
RUN toolkit-trim && rm /usr/local/sbin/toolkit-trim

# the GPU image keeps its base's layers and environment (CUDA's library paths): --target demo-gpu
FROM demo-build AS demo-gpu
WORKDIR /app
COPY exports/ exports/
USER toolkit
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOOLKIT_PORT', '7860') + '/v2/health/ready', timeout=4)"]
CMD ["toolkit", "serve", "exports"]

FROM scratch AS demo
COPY --from=demo-build / /
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    TOOLKIT_HOST=0.0.0.0 \
    TOOLKIT_PORT=7860
WORKDIR /app
COPY exports/ exports/
USER toolkit
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOOLKIT_PORT', '7860') + '/v2/health/ready', timeout=4)"]
CMD ["toolkit", "serve", "exports"]
