# Placeholder until the demo issue (#4) builds the inference image: slim base, the
# torch-free inference install, exports/ copied in, a non-root user, `toolkit serve`.
# No Docker engine runs on the development machines, so this file is not built here.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir .
CMD ["toolkit", "--help"]
