# The two commands of the README. Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on these machines; GPU users install their own CUDA torch first
# (see README) and any torch>=2.4 satisfies the project.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,trl,ray]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/entropy-probe demo

# One CPU thread: the tests run tiny models, where thread start-up and contention cost 10x more
# than the arithmetic (a 40-probe calibration test: 120 s with 2 threads, 7 s with 1).
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) state demo-checkpoint
