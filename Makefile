# Two commands set up and test a fresh clone:   make setup && make test
# Upstream LLaVA-NeXT comes from LLAVA_NEXT_SRC (a local checkout, a git mirror or a git URL).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
LLAVA_NEXT_SRC ?= https://github.com/LLaVA-VL/LLaVA-NeXT.git

.PHONY: setup setup-gpu upstream test test-all demo eval-demo bench clean-upstream help

help:
	@echo "make setup       create $(VENV), install pinned deps, the project and upstream LLaVA-NeXT (+patches)"
	@echo "make setup-gpu   setup, plus flash-attn (CUDA hosts only)"
	@echo "make test        run the test suite (skipped tests are listed with their reasons)"
	@echo "make demo        convert two fixture datasets, train the tiny model, predict an action"
	@echo "make eval-demo   record scripted Lift demos, convert, train the tiny model, evaluate it closed-loop (vla-eval)"
	@echo "make bench       run the benchmarks under bench/"
	@echo "env: LLAVA_NEXT_SRC=$(LLAVA_NEXT_SRC)  REQUIRE_UPSTREAM=1 makes a missing upstream fatal"

SETUP_ENV := LLAVA_NEXT_SRC="$(LLAVA_NEXT_SRC)" PYTHON="$(PYTHON)" VENV="$(VENV)"

setup:
	@$(SETUP_ENV) bash scripts/setup.sh

setup-gpu: setup
	@$(SETUP_ENV) bash scripts/setup.sh --gpu

upstream:
	@$(SETUP_ENV) bash scripts/setup.sh --upstream-only

test:
	@$(PY) -m pytest -rs $(PYTEST_ARGS)

demo:
	@$(PY) -m llava_vla_plugin.apps.demo $(DEMO_ARGS)

eval-demo:
	@MUJOCO_GL=egl $(PY) -m llava_vla_plugin.apps.eval_demo $(EVAL_DEMO_ARGS)

bench:
	@$(PY) bench/run_all.py

clean-upstream:
	rm -rf .upstream
