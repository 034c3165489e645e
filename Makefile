# alexnet_ext developer commands. `make help` lists them.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= gpu-report
PYTEST_ARGS ?=
# The shared SIMT emulator (runs the CUDA kernels on the CPU) lives beside the checkout.
EMU_DIR ?= ../shared/simt-emu
# Kernels whose grid-stride loops the emulator runs with a clamped grid (so a
# thread takes several iterations): its default list plus our 3x3/2 pool kernels.
EMU_GRID_STRIDE_KERNELS ?= lrn_forward_kernel,lrn_backward_kernel,forward_per_output,backward_gather,relu_grad_kernel,reduce_splits_kernel,forward_3x3s2,backward_3x3s2,backward_3x3s2_columns,col2im_kernel
EMU_SUITES ?= self,lrn,pool,conv
# The emulator's suites do not know the fused LRN + max-pool: our own CPU
# tests of it run its CUDA kernels there instead.
EMU_PYTEST ?= tests/test_fused.py -q -k "cpu and not isa"

.PHONY: help deps install test test-cuda bench train cuda-check emu-check info gpu-report clean

help:
	@echo "make install     build and install alexnet_ext in editable mode (needs torch)"
	@echo "make test        install what is missing, build, run the test suite"
	@echo "make train       short default training run on the built-in synthetic data (CPU ok)"
	@echo "make bench       run every benchmark (CUDA rows need a GPU)"
	@echo "make cuda-check  compile every .cu file for sm_80/sm_90, print registers and spills"
	@echo "make emu-check   run the CUDA kernels on the CPU in $(EMU_DIR) (skipped when it is absent)"
	@echo "make gpu-report OUT=dir  on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks"
	@echo "make info        what was built and which GPUs are visible"
	@echo "make clean       remove build outputs"

# PyTorch is pinned only when none is installed: a CUDA build that is already
# there is kept (an unpinned torch would pull several GB of CUDA wheels).
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	@$(PYTHON) -c "import ninja, numpy, pytest, PIL, tqdm, matplotlib, setuptools, wheel" 2>/dev/null || \
		$(PIP) install ninja numpy pytest pillow tqdm matplotlib setuptools wheel

install: deps
	$(PIP) install --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-cuda: install
	$(PYTHON) -m pytest -m cuda $(PYTEST_ARGS)

bench: install
	$(PYTHON) benchmarks/bench_lrn.py
	@for b in benchmarks/bench_pool.py benchmarks/bench_fused.py benchmarks/bench_conv.py benchmarks/bench_train.py; do \
		if [ -f $$b ]; then $(PYTHON) $$b || exit 1; fi; done

train: install
	$(PYTHON) -m alexnet_ext.train --epochs 3 --plot

cuda-check:
	$(PYTHON) tools/cuda_check.py

# Builds our csrc/ (kernels and host op wrappers) into the emulator and checks
# every op, dtype and layout against PyTorch in float64. Needs g++, the CUDA
# headers and this Python's torch and numpy (deps); no GPU and no installed
# alexnet_ext.
emu-check: deps
	@if [ -x "$(EMU_DIR)/run.sh" ]; then \
		echo "emu-check: $(EMU_DIR)/run.sh . --suites $(EMU_SUITES)"; \
		PYTHON="$$(command -v $(PYTHON))" SIMT_EMU_GRID_STRIDE_KERNELS="$(EMU_GRID_STRIDE_KERNELS)" \
			"$(EMU_DIR)/run.sh" . --suites $(EMU_SUITES) && \
		echo "emu-check: $(EMU_DIR)/pytest.sh . $(EMU_PYTEST)" && \
		PYTHON="$$(command -v $(PYTHON))" "$(EMU_DIR)/pytest.sh" . $(EMU_PYTEST); \
	else \
		echo "emu-check: skipped, $(EMU_DIR) not found (the shared SIMT emulator is not beside this checkout)"; \
	fi

info: install
	$(PYTHON) -m alexnet_ext.info

gpu-report:
	bash tools/gpu_report.sh $(OUT)

clean:
	rm -rf build dist *.egg-info .cuda-check alexnet_ext/_C*.so alexnet_ext/_build_config.py
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
