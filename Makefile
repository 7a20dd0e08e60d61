# semiseg — one-command setup. Every target creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned for reproducibility; on a GPU server, install the CUDA build you need first.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow lint demo bench gpu-check lab export clean-nbs check-clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (semiseg)" > /dev/null
	touch $(STAMP)

install: $(STAMP)

# notebooks are the source: nbdev-clean and nbdev-export must leave the tree unchanged
check-clean: install
	@state() { git status --porcelain -- nbs semiseg; git diff -- nbs semiseg; }; before="$$(state | md5sum)"; \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export && \
	if [ "$$before" != "$$(state | md5sum)" ]; then \
	  echo "nbdev-clean / nbdev-export changed nbs/ or semiseg/: export and clean the notebooks, then commit:"; \
	  git status --short -- nbs semiseg; exit 1; fi

# torch's OpenMP threads spin-wait by default, which slows parallel test processes on 2 cores many times over
test: export OMP_WAIT_POLICY := PASSIVE
test: check-clean
	$(BIN)/ruff check semiseg
	$(BIN)/python -m pytest -q tests

# style of the package (line length 120, pycodestyle errors and warnings, pyflakes): [tool.ruff] in pyproject.toml;
# `make test` runs it first
lint: install
	$(BIN)/ruff check semiseg

# the cells marked `#| slow` (longer training runs): run them all
test-slow: install
	$(BIN)/nbdev-test --flags slow --n-workers 1 --skip-folder-re "^exp$$"

# the CPU demo: supervised + every method at 1/16 labels on the embedded benchmark, figures and runs/demo/report.md,
# within 15 min on 2 cores including the first install: the sweep gets what is left of 14 min (iterations per run
# scale to it; the report says how many). A rerun reuses the finished runs.
demo: export OMP_WAIT_POLICY := PASSIVE
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	$(BIN)/semiseg-demo --out runs/demo --budget $$((840 - $$(date +%s) + start))

bench: install
	$(BIN)/semiseg-bench

# every method in fp16 and bf16 on random VOC-shaped batches under torchrun + NCCL: one GPU, then two if there are two
gpu-check: install
	$(BIN)/torchrun --standalone --nproc_per_node=1 -m semiseg.bench --gpu-check
	@if [ "$$($(BIN)/python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then \
	  $(BIN)/torchrun --standalone --nproc_per_node=2 -m semiseg.bench --gpu-check; fi

lab: install
	$(BIN)/jupyter lab --notebook-dir=nbs $(LAB_ARGS)

export: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
