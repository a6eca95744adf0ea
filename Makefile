# The two commands of the README. Both run the whole set-up first (idempotent, seconds when done).
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

# The main job: the whole pipeline through Airflow on the embedded defaults, then a summary.
demo: setup
	bash scripts/demo.sh

# The whole test suite, slow end-to-end tests included (what CI runs).
test: setup
	.venv/bin/python -m pytest -q --timeout 3000 --durations=15

# Quick loop while developing: skips Spark/Airflow/torchrun end-to-end tests.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
