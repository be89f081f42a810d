# The inference image: the torch-free serving install (toolkit[serve]: ONNX Runtime, NumPy, Pillow,
# Gradio), the contents of exports/, and `toolkit serve` on all interfaces, as a non-root user.
#
#   CPU:  docker build -t toolkit-demo . && docker run --rm -p 127.0.0.1:7860:7860 toolkit-demo
#   GPU (TensorRT + ONNX Runtime CUDA; base image with CUDA and Python 3.10+):
#         docker build --build-arg BASE=nvcr.io/nvidia/tensorrt:24.12-py3 --build-arg GPU=1 -t toolkit-demo:gpu .
#         docker run --rm --gpus all -p 127.0.0.1:7860:7860 toolkit-demo:gpu
#
# No Docker engine runs on the machines this project is developed on, so this file is not built
# there; tests/test_serve_install.py runs its install, entry command and health check outside Docker.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG GPU=0

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
COPY demo/ demo/
# GPU=1 swaps ONNX Runtime for its CUDA build and adds TensorRT with cuda-python (toolkit[trt])
# (the build leaves build/ and an .egg-info folder in /app: removed in the same layer)
RUN pip install ".[serve]" && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime && pip install ".[trt]"; fi \
    && rm -rf build ./*.egg-info

COPY exports/ exports/
RUN useradd --create-home --uid 10001 toolkit
USER toolkit

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOOLKIT_PORT', '7860') + '/', timeout=4)"]
CMD ["toolkit", "serve", "exports"]
