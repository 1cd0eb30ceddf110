# leffa: make install | test | demo | shards | bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is pinned here so that pip takes a known build (CUDA wheels on Linux x86_64).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo shards bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
