# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-tpu-plan demo bench lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The suite runs on TEST_WORKERS processes (pytest-xdist); each test file stays on one of them,
# so a file's module fixtures are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q \
	-n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) --durations=15 tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# The TPU compiler's tests (goose-plan, bench/pod_plan.py --target tpu): libtpu is a 0.7 GB
# wheel, so it is an extra of its own rather than part of `make test`.
test-tpu-plan: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,tpu-plan]"
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests/test_plan.py

# The time printed last includes the install when the environment had to be built.
demo:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(STAMP) && \
	$(PY) -m goose_jax.cli.demo $(DEMO_ARGS) && \
	echo "make demo: $$(( $$(date +%s) - start ))s in all, environment set-up included"

bench: $(STAMP)
	$(PY) bench/t5_forward.py

# The site (docs/_build/html): Sphinx with MyST and myst-nb, what jax, flax, optax and orbax use.
# Every warning is an error, and the tutorials under docs/tutorials/ run at each build (a cell that
# fails fails it). Its own stamp: the docs extra is installed once, beside the test extra.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP) setup.py
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build/html docs/api/_generated
	GOOSE_QUIET=1 $(PY) -m sphinx -W --keep-going -q -j 2 -b html docs docs/_build/html
	@echo "make docs: docs/_build/html/index.html"

# Every Python directory of the checkout.
LINT_DIRS := goose_jax tests bench configs train eval tools docs

# ruff; the layer contracts of pyproject.toml (each package imports only those below it, the
# families never each other); and tools/lint_imports.py (no goose_jax import inside a function
# outside cli/, no private name across modules).
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tools/lint_imports.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache docs/_build docs/api/_generated docs/jupyter_execute
