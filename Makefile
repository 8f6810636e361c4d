# Two commands do all set-up: `make demo` runs the pipeline on the embedded demo corpus,
# `make test` runs the tests. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run
export RAY_AUTH_MODE ?= token
export PYTHONHASHSEED := 0
# Ray's OpenTelemetry metrics thread has crashed a TrainController actor here (SIGSEGV in
# TemporalMetricStorage::buildMetrics); local runs have no dashboard to read them anyway.
export RAY_enable_metrics_collection ?= 0

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m vits_ray demo --out $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -ra --durations=25

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) bench/bench_prepare.py
	$(PY) bench/bench_reader.py
	$(PY) bench/bench_train.py
	$(PY) bench/faults.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_tune.py
	$(PY) bench/bench_search.py --markdown
	$(PY) bench/bench_precision.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
