# The two commands of the README: `make smoke` (whole pipeline, embedded sample, CPU) and `make test`.
PYTHON ?= python3
PROFILE ?= smoke
OUT ?= runs/$(PROFILE)

.PHONY: install smoke full test
install: .installed
.installed: pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps "torchxrayvision>=1.2"
	$(PYTHON) -m ipykernel install --user --name python3 >/dev/null
	touch .installed

smoke: .installed
	$(PYTHON) -m medcap_helpers.cli run --profile smoke --out $(OUT)

test: .installed
	$(PYTHON) -m pytest
