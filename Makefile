# leffa: make install | test | demo | shards | bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is pinned here so that pip takes a known build (CUDA wheels on Linux x86_64).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo shards bench clean

# make shards DATASET=vitonhd SRC=/data/VITON-HD OUT=shards/vitonhd [SPLIT=all] [SHARD_SIZE=1000] [WORKERS=2]
DATASET    ?=
SRC        ?=
OUT        ?=
SPLIT      ?= all
SHARD_SIZE ?= 1000
WORKERS    ?= 2

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

shards: install
	@test -n "$(DATASET)" || { echo "error: set DATASET=vitonhd|dresscode|deepfashion|synthetic"; exit 2; }
	@test -n "$(OUT)" || { echo "error: set OUT=<folder for the shards>"; exit 2; }
	$(PY) -m data_prep $(DATASET) --src "$(SRC)" --out "$(OUT)" --split $(SPLIT) --shard-size $(SHARD_SIZE) --workers $(WORKERS)

clean:
	rm -rf $(VENV) *.egg-info
