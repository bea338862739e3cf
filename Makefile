# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use
# and install what they need (torch first, so CPU machines take the CPU wheel); later runs
# skip the install unless pyproject.toml changed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvdistill-installed
DEMO_OUT ?= demo-out

.PHONY: install demo test lint imports slurm-packages

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvdistill demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The import contracts of pyproject.toml ([tool.importlinter]). import-linter finds modules under
# the root package's folder: kvdistill/<stage> are links to the top-level stage folders.
imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

# slurm-wlm + munge for the real single-node cluster of tests/test_slurm.py (Debian, as root).
# Quick when installed; if apt fails the SLURM tests skip, the build does not fail.
SLURM_BINS := sbatch squeue sinfo scancel slurmctld slurmd munged
slurm-packages:
	@missing=""; for b in $(SLURM_BINS); do \
	  command -v $$b >/dev/null 2>&1 || test -x /usr/sbin/$$b || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "missing$$missing (need root and apt-get to install): SLURM tests will be skipped"; exit 0; fi; \
	echo "missing$$missing: installing slurm-wlm munge"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
	  || echo "slurm packages unavailable: SLURM tests will be skipped"

test: $(STAMP) slurm-packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory imports
	$(VENV)/bin/python -m pytest
