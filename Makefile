# One command for the main job, one for the tests; both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtw-installed

.PHONY: install demo test lint

$(STAMP): setup.py scripts/install.sh
	./scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vtw_vllm.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
