# ortserve: serves model_repository/ on ports 8001 (gRPC) and 8000 (HTTP: KServe v2 REST, OpenAI API).
#   CPU (default):  docker build -t ortserve .
#   CUDA:           docker build -t ortserve:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 .
#                   docker run --gpus all -p 8001:8001 -p 8000:8000 ortserve:cuda
# onnxruntime-gpu (a dependency on Linux x86_64) runs on the CPU when no GPU is
# present, so both images install the same way; the CUDA base adds CUDA 13 and cuDNN 9.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1 installs with a C compiler, which builds the compiled sampler
# (server/core/_sampling.c); the image that runs does not carry the compiler.
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1
# The CUDA base images have no Python; the python images have it (with its headers) already.
RUN apt-get update \
    && if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 ortserve
WORKDIR /app
COPY --chown=ortserve:ortserve . /app
USER ortserve
RUN bash scripts/setup.sh --runtime

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN useradd --create-home --uid 10001 ortserve
COPY --from=build --chown=ortserve:ortserve /app /app
WORKDIR /app
USER ortserve

EXPOSE 8001 8000 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD [".venv/bin/python", "-m", "server.healthcheck", "--address", "127.0.0.1:8001"]
CMD [".venv/bin/ortserve", "serve", "--model-repository", "model_repository", "--port", "8001", "--http-port", "8000"]
