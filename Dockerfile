# ortserve: serves the model repository mounted at /models (the example repository is baked in as a default)
# on 8001 (gRPC), 8000 (HTTP: KServe v2 REST, OpenAI API) and 8002 (Prometheus metrics).
#   CPU (default, onnxruntime):  docker build -t ortserve .
#   CUDA (onnxruntime-gpu):      docker build -t ortserve:cuda --build-arg ONNXRUNTIME=gpu \
#                                  --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 .
#   docker run -p 8001:8001 -p 8000:8000 -p 8002:8002 -v "$PWD/my_models:/models:ro" ortserve
# The image runs as uid 10001 and writes only to /tmp (the workers' private sockets), so it runs with a
# read-only root file system given a writable /tmp (docker run --read-only --tmpfs /tmp).
ARG BASE_IMAGE=python:3.11-slim

# Stage 1 builds a virtual environment in /opt/ortserve with a C compiler (for the compiled
# sampler, server/core/_sampling.c); the image that runs copies the environment, not the compiler.
FROM ${BASE_IMAGE} AS build
ARG ONNXRUNTIME=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CUDA base images have no Python; the python images have it (with its headers) already.
RUN apt-get update \
    && if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ortserve
WORKDIR /src
# The dependencies first, in a layer that changes only with the dependency spec (pyproject.toml),
# not with the code; ONNXRUNTIME picks the CPU or the GPU build of ONNX Runtime.
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN python3 scripts/requirements.py --onnxruntime "${ONNXRUNTIME}" > requirements.txt \
    && /opt/ortserve/bin/pip install --requirement requirements.txt
# Then the code, installed as a package (not editable): only what the server needs, no tests or benchmarks.
COPY setup.py README.md ./
COPY server ./server
RUN /opt/ortserve/bin/pip install --no-deps .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/ortserve/bin:$PATH
RUN if ! python3 -c 'import venv' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN useradd --create-home --uid 10001 ortserve
COPY --from=build /opt/ortserve /opt/ortserve
COPY --chown=10001:10001 model_repository /models
USER 10001
WORKDIR /home/ortserve

EXPOSE 8001 8000 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--address", "127.0.0.1:8001"]
CMD ["ortserve", "serve", "--model-repository", "/models", "--port", "8001", "--http-port", "8000", \
     "--metrics-port", "8002"]
