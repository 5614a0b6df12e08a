# syntax=docker/dockerfile:1.7
# The worldmesh worker: one stage of a pipeline (`worldmesh worker --config ...`).
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t worldmesh-worker:0.1.0 .
# GPU (CUDA 12.8 wheels of torch; needs the NVIDIA container runtime on the node):
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu128 \
#     -t worldmesh-worker:0.1.0-cuda .
# TORCH_VARIANT is a directory of https://download.pytorch.org/whl/ (cpu, cu126, cu128, ...).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: compilers live only here ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, so the project's `torch==2.13.0` is already satisfied.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
      "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY operator/ operator/
RUN pip install ".[models]"
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
USER 10001:10001
WORKDIR /home/worldmesh
# 8080: Open Inference Protocol, health and /metrics; 8081: the control API. World ports
# (TCPStore, heartbeat) are ephemeral.
EXPOSE 8080 8081
ENTRYPOINT ["worldmesh", "worker"]
CMD ["--config", "/etc/worldmesh/worker.yaml"]
