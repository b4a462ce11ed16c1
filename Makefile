# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv with exactly the versions of requirements/lock.txt (the environment the suite passed in) and
# installs the project into it first when needed. `make lock` refreshes the lock, `make drift` checks the ranges.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: demo test install lock drift

install: $(STAMP)

# A new lock gets a new environment (nothing from the old one stays behind). Sources are built against the locked
# setuptools (no build isolation, which would fetch the newest); DeepSpeed's ops are compiled on first use.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $$(grep -E '^(pip|setuptools)==' $(LOCK))
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -r $(LOCK)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llava-manager ablation

# One thread per process: tiny models gain nothing from more, and the 2-rank DeepSpeed tests share 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Maintainers: rebuild a throwaway environment from pyproject.toml's ranges (the newest versions they allow), run the
# suite in it, and only if it passes write its versions to requirements/lock.txt (`lock`) or just report (`drift`).
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh refresh

drift:
	PYTHON=$(PYTHON) bash scripts/lock.sh drift
