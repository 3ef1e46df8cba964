# The two commands of the README. Both set up .venv first (idempotent, ~1 min the first time).
.PHONY: setup demo test bench lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/hardbatch train

test: setup
	@bash scripts/test-deps.sh
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/hardbatch bench frontier --out bench-out

lint: setup
	.venv/bin/ruff check . && .venv/bin/mypy
