# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-int8 -mno-amx-tile -mno-amx-bf16
endif
# llama-cpp-python's pin, installed before tokensteer so that our kernels compile against its ggml
LLAMA  := $(shell grep -o '"llama-cpp-python[^"]*"' pyproject.toml)
NATIVE := $(wildcard src/tokensteer/backends/llamacpp/native/*.[ch])

.PHONY: run test install clean-venv

$(STAMP): pyproject.toml setup.py $(NATIVE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=68'
	# llama-cpp-python compiles from source the first time (several minutes); pip caches the wheel.
	# Its AMX kernels crash on Q4_K weights (llama.cpp #20824), so they are compiled out (the
	# backend loads weights unrepacked anyway, so a row's logits do not depend on its batch).
	CMAKE_BUILD_PARALLEL_LEVEL=2 CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/python -m pip install -q $(LLAMA)
	# tokensteer, with its C kernels compiled once per instruction set against that ggml (setup.py,
	# docs/native.md); without a compiler it installs all the same and runs its pure fallbacks.
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tokensteer generate

# The tests marked `fallback` (the native kernels change their code paths), run again with the
# kernels off so that the pure fallbacks stay tested (docs/native.md).
FALLBACK_TESTS := tests/test_native.py tests/test_llamacpp.py tests/test_llamacpp_head.py

test: $(STAMP)
	# tests/test_playground.py drives Debian's chromium; install it when missing and we are root
	test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -q
	TOKENSTEER_NO_NATIVE=1 $(BIN)/python -m pytest -q -m fallback $(FALLBACK_TESTS)

clean-venv:
	rm -rf $(VENV)
