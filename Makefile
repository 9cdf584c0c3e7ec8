# Developer entry points. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv lint test demo bench format clean browser

venv: $(VENV)/.installed

# Re-installs only when pyproject.toml changes (or the stamp is missing).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy orchestrator

# The dashboard's browser test drives Debian's chromium through chromedriver: install them
# when missing (as root, with apt-get); otherwise that test skips, or fails when CI is set.
browser:
	@if test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else echo "chromium or chromedriver missing and not root: the dashboard browser test will skip" >&2; fi

# Integration tests run a second time with RabbitMQ as the broker (a vhost per module, made
# with rabbitmqctl; state and results stay in Redis). Without RabbitMQ they skip, or fail
# when CI is set.
AMQP_TESTS := $(addprefix tests/integration/,test_engine.py test_control_flow.py \
	test_examples.py test_waits.py test_brokers.py \
	test_recovery.py::test_a_sigkilled_worker_nodes_step_runs_again_elsewhere_within_the_lease)

# pytest exits 5 when it collects no tests; make fails on it like any non-zero status.
# Three xdist workers, a test file each at a time (module fixtures stay whole): the suite
# mostly waits on real processes, so it takes about 4 minutes on 2 cores instead of 10.
TEST_WORKERS ?= 3
test: venv lint browser
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15 tests
	$(BIN)/pytest -q -p no:cacheprovider --broker amqp $(AMQP_TESTS)

demo: venv
	$(BIN)/orchestrator demo

# Starts its own redis-server and workers; ~13 minutes on 2 cores. BENCH_ARGS=--quick for a smoke run.
bench: venv $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(BIN)/python -m pip install -e '.[test,bench]'
	touch $@

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Build and cache artifacts only; the virtualenv stays (rm -rf .venv to rebuild it).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
