# The two commands of the README: `make smoke` (whole pipeline, embedded sample, CPU) and `make test`.
# Without an active virtual environment they create and use .venv (Debian/Ubuntu's system Python
# refuses `pip install`: PEP 668, "externally-managed-environment"); inside one they use it.
PROFILE ?= smoke
OUT ?= runs/$(PROFILE)
ifdef VIRTUAL_ENV
PYTHON ?= python3
VENV_READY :=
else ifdef CONDA_PREFIX
PYTHON ?= python3
VENV_READY :=
else
PYTHON ?= .venv/bin/python
VENV_READY := .venv/bin/python
endif

.PHONY: install smoke full test
install: .installed

.venv/bin/python:
	python3 -m venv .venv

.installed: pyproject.toml $(VENV_READY)
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps "torchxrayvision>=1.2"
	$(PYTHON) -m ipykernel install --user --name python3 >/dev/null
	touch .installed

smoke: .installed
	$(PYTHON) -m medcap_helpers.cli run --profile $(PROFILE) --out $(OUT)

test: .installed
	$(PYTHON) -m pytest
