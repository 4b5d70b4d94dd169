# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvevict-installed
# CPU build of torch unless told otherwise (e.g. TORCH_INDEX=--index-url https://download.pytorch.org/whl/cu128).
TORCH_INDEX ?=
DEMO_MODEL ?= models/demo-py

.PHONY: demo test proto check-proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "kvevict needs Python 3.11 or 3.12"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so that no other requirement pulls a different (CUDA) build.
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py --model $(DEMO_MODEL)

test: $(STAMP) check-proto
	scripts/install_system_deps.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

proto: $(STAMP)
	PYTHON=$(PY) scripts/gen_proto.sh

check-proto: $(STAMP)
	PYTHON=$(PY) scripts/check_proto.sh

clean:
	rm -rf $(VENV) .pytest_cache
