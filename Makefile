# leffa: make install | test | test-fast | test-gpu | demo | shards | bench | bench-gpu | replicate | fidelity
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is pinned here so that pip takes a known build (CUDA wheels on Linux x86_64).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast test-gpu demo shards bench bench-gpu replicate fidelity clean

# One torch (OpenMP) thread per process for every target: the tiny CPU models run as fast on one
# thread as on two, and beside another busy process two spinning OpenMP threads slow to a crawl,
# where one thread takes its fair share (README, "Threads"). Override: make demo OMP_NUM_THREADS=2
export OMP_NUM_THREADS ?= 1

# make shards DATASET=vitonhd SRC=/data/VITON-HD OUT=shards/vitonhd [SPLIT=all] [SHARD_SIZE=1000] [WORKERS=2]
# make shards DATASET=folder SRC=my_data OUT=shards/my_data   (your own photos: see data_prep/own_photos.py)
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

# Every test (CI). test-fast is the inner loop: it leaves out the tests marked slow, distributed
# (several processes) and slurm (a cluster), under 2 minutes on 2 cores; see the markers in pyproject.toml.
test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow and not distributed and not slurm" $(PYTEST_ARGS)

# The GPU checks (tests marked gpu: bf16, compile, FSDP1/FSDP2 and sampling on CUDA; under 5 minutes
# on one GPU). Without CUDA they skip, each with its reason.
test-gpu: install
	$(PY) -m pytest tests -m gpu -rs $(PYTEST_ARGS)

shards: install
	@test -n "$(DATASET)" || { echo "error: set DATASET=vitonhd|dresscode|deepfashion|synthetic|folder"; exit 2; }
	@test -n "$(OUT)" || { echo "error: set OUT=<folder for the shards>"; exit 2; }
	$(PY) -m data_prep $(DATASET) --src "$(SRC)" --out "$(OUT)" --split $(SPLIT) --shard-size $(SHARD_SIZE) --workers $(WORKERS)

# The whole chain on this machine: synthetic shards (the smooth texture family: its colours say where
# a pixel came from), the tiny model with the Leffa loss and the committed tiny VAE, on CPU.
demo: install
	rm -rf demo_out
	$(PY) -m data_prep synthetic --texture smooth --out demo_out/shards --count 64 --split all --shard-size 16 --workers 2 --height 64 --width 48
	$(VENV)/bin/leffa fit --config configs/tiny_synthetic.yaml
	@run=$$(ls -d demo_out/tiny_synthetic/version_* | tail -n 1); \
	echo; echo "demo finished:"; \
	echo "  TensorBoard logs  $$run   (.venv/bin/tensorboard --logdir demo_out)"; \
	echo "  checkpoint        $$run/checkpoints/last.ckpt"; \
	echo "  sample grid       $$(ls $$run/samples/*.png | tail -n 1)"; \
	echo "  flow pictures     $$(ls -d $$run/flows/step_* | tail -n 1)   (val/flow_epe_px in TensorBoard)"; \
	echo "  resolved config   $$run/config.yaml"

# Every script in benchmarks/, one table; also written to benchmarks/results.md (a few minutes on 2 cores).
bench: install
	$(PY) benchmarks/run_all.py --out benchmarks/results.md

# Training speed on one GPU: every model.speed switch side by side at both try-on stage shapes, with
# samples/s, MFU and peak memory; writes benchmarks/results_gpu_speed.md (about 8 minutes on an H100).
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py --out benchmarks/results_gpu_speed.md

# The paper's claim at CPU scale on the synthetic set, per texture family and architecture: writes replicate/report.md, results.json, figures/ (under 25 min on 2 free cores).
replicate: install
	$(PY) replicate/run.py --out replicate --vae trained

# Does the Leffa loss reach the pixels? make demo's protocol with and without it, 3 seeds; masked PSNR/SSIM
# of the sampled images, flow EPE and scale rows on held-out samples: writes replicate/fidelity/ (report.md,
# results.json, grids/; about 40 min on 2 free cores).
fidelity: install
	$(PY) replicate/fidelity.py --out replicate/fidelity

clean:
	rm -rf $(VENV) *.egg-info

# The packages for the SLURM integration test (tests/test_slurm.py): a one-machine cluster.
# Skipped with a message where apt-get is missing or we are not root; the test then skips too.
SLURM_PKGS ?= slurmctld slurmd slurm-client munge iproute2

.PHONY: slurm-deps
slurm-deps:
	@if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "slurm-deps: apt-get not found, skipping (tests/test_slurm.py will skip)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "slurm-deps: not root, skipping (tests/test_slurm.py will skip)"; \
	elif dpkg -s $(SLURM_PKGS) >/dev/null 2>&1; then \
	  echo "slurm-deps: $(SLURM_PKGS) already installed"; \
	else \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $(SLURM_PKGS) || { apt-get update -q && apt-get install -y -q $(SLURM_PKGS); }; \
	fi
