# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-int8 -mno-amx-tile -mno-amx-bf16
endif

.PHONY: run test install clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama-cpp-python compiles from source the first time (about 6-7 minutes); pip caches the wheel.
	# Its AMX kernels crash on Q4_K weights (llama.cpp #20824), so they are compiled out (the
	# backend loads weights unrepacked anyway, so a row's logits do not depend on its batch).
	CMAKE_BUILD_PARALLEL_LEVEL=2 CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tokensteer generate

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
