# The front door: `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.installed

DOMAINS ?= natural,medical
CONFIG  ?= conf/default.yaml
SHARDS  ?= data/shards
ARGS    ?=
RESUME  ?=
RUN     ?=
GPUS    ?=
NODES   ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
CKPT    ?= $(shell ls -t logs/*/version_*/checkpoints/last.ckpt 2>/dev/null | head -n 1)

.PHONY: help install data train eval bench study test test-fast tensorboard notebook clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv with torch, learn2learn and the package (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	# learn2learn 0.2.0 ships no wheels and its C files predate Python 3.11: regenerate them with Cython. Its declared
	# requirements (gsutil, qpth, cvxpy, and a numpy<2 pin through them) are not needed by its import, which needs gym,
	# scipy, requests and tqdm: install it without them, and this package's requirements from pyproject.toml apart,
	# then the package itself without resolving learn2learn's requirements again.
	$(PIP) install cython wheel setuptools gym scipy requests tqdm
	$(PIP) install --no-deps --no-build-isolation --config-settings=--build-option=build_ext learn2learn==0.2.0
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(r for r in p['dependencies'] + p['optional-dependencies']['dev'] + p['optional-dependencies']['text'] \
	  if not r.startswith('learn2learn')))" > $(VENV)/requirements.txt
	$(PIP) install -r $(VENV)/requirements.txt
	$(PIP) install --no-deps -e .
	touch $(STAMP)

data: install ## Write the synthetic demo shards for DOMAINS into SHARDS (data/shards)
	$(PY) -m metacontrastive prepare synthetic --domain $(DOMAINS) --out $(SHARDS) --overwrite

# one manifest per requested domain; a missing one triggers `make data` for all of them
comma := ,
MANIFESTS := $(foreach d,$(subst $(comma), ,$(DOMAINS)),$(SHARDS)/$(d)/manifest.json)

$(SHARDS)/%/manifest.json: | install
	$(PY) -m metacontrastive prepare synthetic --domain $* --out $(SHARDS)

# GPUS=N launches N processes per machine through torchrun with conf/ddp.yaml (NODES=M machines: run the same
# command on each with its NODE_RANK and the first machine's MASTER_ADDR)
LAUNCH := $(if $(GPUS),$(VENV)/bin/torchrun --nproc_per_node=$(GPUS) --nnodes=$(NODES) --node_rank=$(NODE_RANK) \
  --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT),$(PY))
DDP    := $(if $(GPUS),-c conf/ddp.yaml --trainer.devices=$(GPUS) --trainer.num_nodes=$(NODES))

# CONFIG is a preset stacked on conf/default.yaml (the run: trainer, logger, callbacks), e.g. conf/pretrained.yaml
PRESETS := -c conf/default.yaml $(if $(filter-out conf/default.yaml,$(CONFIG)),-c $(CONFIG))

train: install $(MANIFESTS) ## Train DCMCL on DOMAINS with CONFIG (a preset on conf/default.yaml); GPUS=N [NODES=M] for DDP; RESUME=1 goes on with the newest (or RUN=name) run; ARGS=... overrides
	$(LAUNCH) -m metacontrastive fit $(PRESETS) $(DDP) --data.domains=[$(DOMAINS)] --data.root=$(SHARDS) \
	  $(if $(RUN),--run $(RUN)) $(if $(RESUME),--ckpt_path last) $(ARGS)

eval: install ## Few-shot table of CKPT (default: the newest last.ckpt), every method; ARGS="--episodes 100 ..." overrides
	@test -n "$(CKPT)" || { echo "make eval: no checkpoint under logs/; run 'make train' first or pass CKPT=path/to.ckpt"; exit 1; }
	$(PY) -m metacontrastive evaluate --ckpt $(CKPT) $(ARGS)

STUDY_DATA ?= ../shared/data
STUDY_OUT  ?= results/study

study: install ## The cross-domain study on pretrained towers: every preset x 3 seeds x every method (bench/study.py; STUDY_DATA, STUDY_OUT, ARGS)
	$(PY) bench/study.py --data $(STUDY_DATA) --out $(STUDY_OUT) $(ARGS)

# the suite in TEST_WORKERS pytest-xdist processes (one per core, at most 4), each with its share of torch's threads
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test: install ## Run the test suite (all of it, slow tests included; TEST_WORKERS=1: one process)
	$(PYTEST)

test-fast: install ## Run the tests not marked slow
	$(PYTEST) -m "not slow"

bench: install ## Speed benchmarks: meta-step vs plain step, memory, scaling, loader vs training, feature cache, evaluation (tables in bench/results/)
	$(PY) bench/speed.py --out bench/results $(ARGS)
	$(PY) bench/data_throughput.py --out bench/results
	$(PY) bench/feature_cache.py --out bench/results
	$(PY) bench/evaluate_speed.py --before docs/speed/evaluate_before.json --json bench/results/evaluate_speed.json

tensorboard: install ## Serve the TensorBoard logs in logs/ on port 6006
	$(VENV)/bin/tensorboard --logdir logs --port 6006

notebook: install ## Open notebooks/ in Jupyter Notebook (installs the notebook extra of pyproject.toml into .venv if missing)
	test -x $(VENV)/bin/jupyter-notebook || $(PIP) install $$($(PY) -c "import tomllib; \
	  print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['notebook']))")
	$(VENV)/bin/jupyter notebook notebooks/

clean: ## Remove generated shards, logs and caches (keeps .venv)
	rm -rf $(SHARDS) logs lightning_logs .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
