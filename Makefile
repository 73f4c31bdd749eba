# One venv, made from requirements*.txt; every target creates it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CHECKPOINT := .cache/demo-checkpoint
PORT ?= 3000

.PHONY: setup demo run test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

$(DEMO_CHECKPOINT)/config.json: $(STAMP) qwenserve/checkpoints.py
	HF_HUB_OFFLINE=1 $(PY) -m qwenserve.checkpoints demo $(DEMO_CHECKPOINT)

demo: $(DEMO_CHECKPOINT)/config.json
	HF_HUB_OFFLINE=1 MODEL_REPO_ID=$(DEMO_CHECKPOINT) SERVED_MODEL_NAME=qwen3-vl-demo PORT=$(PORT) $(PY) main.py

run: $(STAMP)
	$(PY) main.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# ~30 min on the 2-core CPU; BENCH_QUICK=1 for a smoke run, BENCH_SKIP_REALSIZE=1 and other knobs: bench/plan.py.
# Figures go to bench-results/latest.md (and .json), server logs to bench-results/.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(PY) -m bench.run

clean:
	rm -rf .cache .pytest_cache
