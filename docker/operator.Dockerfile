# syntax=docker/dockerfile:1.7
# The worldmesh operator: kopf running worldmesh_operator.handlers (see helm/worldmesh).
#
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t worldmesh-operator:0.1.0 .
# The operator never runs a model, but the project depends on torch: pass PyTorch's
# CPU-only wheel index as TORCH_INDEX_URL (--build-arg) to keep the image small (unset:
# pip's default index, whose Linux wheel pulls the CUDA libraries).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: compilers live only here ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG KOPF_VERSION=1.45.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY operator/ operator/
RUN pip install . "kopf==${KOPF_VERSION}"
# validate.py falls back to the CRD shipped as package data (worldmesh_operator/crds/).
COPY crds/modeldeployment.yaml /tmp/crd.yaml
RUN install -D -m 0644 /tmp/crd.yaml \
      "$(python -c 'import worldmesh_operator, os; print(os.path.dirname(worldmesh_operator.__file__))')/crds/modeldeployment.yaml"

# --- final: the interpreter, the venv, a non-root user -------------------------------
FROM ${PYTHON_IMAGE} AS final
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 worldmesh \
 && useradd --system --uid 10001 --gid worldmesh --home-dir /home/worldmesh --create-home worldmesh
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/worldmesh
# kopf's liveness endpoint (--liveness=http://0.0.0.0:8080/healthz, set by the chart).
EXPOSE 8080
ENTRYPOINT ["kopf"]
CMD ["run", "--module=worldmesh_operator.handlers", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
