# Two commands on a fresh machine:  `make demo`  (the whole flow on ml-latest-small)  and  `make test`.
# Each creates the virtual environment it needs in .venv on first use.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
WORKDIR  ?= work
SHARED   ?= ../shared/data
# Posters are never shipped; the demo uses them when the shared data folder is next to the project.
POSTERS  ?= $(if $(wildcard $(SHARED)/movielens-posters),$(SHARED)/movielens-posters,)
# faiss-gpu where nvidia-smi sees a GPU, faiss-cpu otherwise (never both).
FAISS    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The local CPU wheel of torch where this machine has one; otherwise uv picks the PyTorch build for the hardware.
TORCH_SRC := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--torch-backend=auto)

.PHONY: demo test test-fast bench env clean
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv>=0.5,<1"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode $(TORCH_SRC) "torch==2.13.0" -e ".[$(FAISS),dev]"
	touch $@

demo: env
	$(BIN)/recsys demo --workdir $(WORKDIR) $(if $(POSTERS),--posters $(POSTERS),)

test: env
	$(BIN)/python -m pytest -q tests

# The development loop: unit and contract tests, no demo and no whole-stage runs (`-m "not slow"`); `make test`
# (and CI) runs everything.
test-fast: env
	$(BIN)/python -m pytest -q -m "not slow" tests

FSDD     ?= $(if $(wildcard $(SHARED)/fsdd/recordings),$(SHARED)/fsdd/recordings,)

bench: env
	$(BIN)/python -m benchmarks.run --workdir $(WORKDIR)/bench $(if $(POSTERS),--posters $(POSTERS),) $(if $(FSDD),--fsdd $(FSDD),)

clean:
	rm -rf $(WORKDIR) .pytest_cache
