# The two commands of the README. Both run the whole set-up first (idempotent, seconds when done).
.PHONY: setup demo test test-slow stack stack-down

setup:
	bash scripts/setup.sh

# The main job: the whole pipeline through Airflow on the embedded defaults, then a summary.
demo: setup
	bash scripts/demo.sh

# The default test run (< 20 min on 2 cores): everything but the slow end-to-end tests.
test: setup
	.venv/bin/python -m pytest -q --timeout 1800 --durations=15 -m "not slow"

# The slow end-to-end tests (Spark, Airflow, torchrun, the stack); CI runs them after `test`.
test-slow: setup
	.venv/bin/python -m pytest -q --timeout 3000 --durations=15 -m slow

# The compose topology as local processes (PostgreSQL, Spark standalone, MLflow server,
# Airflow services): see docs/scale-out.md. `make stack-down` stops it.
stack: setup
	bash scripts/stack.sh up

stack-down:
	bash scripts/stack.sh down
