.DEFAULT_GOAL := help
PYTHON ?= python

help:  ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## Install covidseg with its test extras (CPU build of torch when torch is absent)
	$(PYTHON) -m pip show torch >/dev/null 2>&1 || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

# Two pytest workers with one thread each (and each process they start): much of the suite waits on
# processes starting, so two workers overlap the waits, and one thread each keeps them from fighting
# over two cores (416 s serial, 363 s with two threads a worker, 266 s with one, on 2 cores).
TEST_WORKERS ?= 2
PYTEST_PARALLEL = OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n $(TEST_WORKERS)

test:  ## Run the whole test suite (about 4.5 minutes on 2 cores)
	$(PYTEST_PARALLEL)

test-fast:  ## Run the quick tier: no training runs, no subprocesses
	$(PYTEST_PARALLEL) -m "not slow"

lint:  ## ruff check and ruff format --check
	$(PYTHON) -m ruff check covidseg tests
	$(PYTHON) -m ruff format --check covidseg tests

train:  ## The first run: learn the synthetic phantoms (no download; about a minute)
	$(PYTHON) -m covidseg.train experiment=quickstart

bench:  ## Measure CPU training/inference throughput of fast_cpu's network (fp32, NHWC, bf16, ONNX); any recipe: python -m covidseg.benchmarks.throughput experiment=...
	$(PYTHON) -m covidseg.benchmarks.throughput experiment=fast_cpu

bench-predict:  ## Time predict with the shipped model over Val COVID-19 X-rays (or phantoms), fp32 vs bf16
	$(PYTHON) -m covidseg.benchmarks.predict

bench-serve:  ## Load-test the server: 200 requests from 16 clients (throughput, p50/p95, errors, memory)
	$(PYTHON) -m covidseg.benchmarks.serve

bench-data:  ## Index and decode-cache time per image for 1k, 10k and 100k phantoms (written once under ~/.cache/covidseg/scaling)
	$(PYTHON) -m covidseg.benchmarks.data_scaling

gpu-check:  ## On a CUDA machine: environment, best_gpu for 300 steps (and DDP on every GPU), eval on GPU; figures to outputs/gpu_check
	$(PYTHON) -m covidseg.benchmarks.gpu_check

serve:  ## Serve the shipped model: page and API on http://127.0.0.1:8000
	$(PYTHON) -m covidseg.serve ckpt_path=pretrained

report:  ## Render learning curves of a run (RUN=outputs/<task>/runs/<date>, default: the newest) to PNG
	$(PYTHON) -m covidseg.learning_curves $(or $(RUN),$(shell ls -td outputs/*/runs/*/ | head -1))

tensorboard:  ## Open TensorBoard on every run under outputs/
	tensorboard --logdir outputs/

.PHONY: help install test test-fast lint train bench bench-predict bench-serve bench-data gpu-check serve report tensorboard
