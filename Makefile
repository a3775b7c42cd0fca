# The two commands of the README, plus helpers. VENV can be moved with UTIO_VENV.
VENV ?= $(or $(UTIO_VENV),.venv)
PY := $(VENV)/bin/python

.PHONY: setup demo test lint suffix

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo_serve.py

test: setup
	bash scripts/run_tests.sh

lint:
	$(VENV)/bin/ruff check .

# optional: vLLM's suffix speculation for `vllm-utio bench-spec --engines suffix`
suffix: setup
	bash scripts/build_suffix_decoding.sh
