# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv and installs the project first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llava-manager ablation

# One thread per process: tiny models gain nothing from more, and the 2-rank DeepSpeed tests share 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q
