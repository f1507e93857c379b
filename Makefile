# `make test` (and the other targets) build .venv themselves from constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The frameworks the suite runs against (CPU builds); versions come from constraints.txt.
TEST_DEPS := tensorflow-cpu transformers accelerate peft lightning equinox

.PHONY: test test-all install demo bench bench-quick docs compat clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,torch,keras,jax,yaml]" $(TEST_DEPS)
	# tf_keras (legacy Keras 2) asks for the `tensorflow` wheel; tensorflow-cpu provides the same module.
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt tf_keras
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The same suite with its longer variants (tests marked slow), about 2 minutes more.
test-all: $(STAMP)
	LAYERLOCK_TEST_ALL=1 $(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/layerlock demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The compatibility matrix: oldest and newest framework versions, one venv each under .compat/
# (not part of CI; writes docs/compat.md). COMPAT_ARGS="--only jax-oldest" runs some of them.
compat:
	$(PYTHON) compat/run.py $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
