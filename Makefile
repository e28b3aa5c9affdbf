# The two commands a new user needs: `make smoke` and `make test`. Both set up .venv first.
# `make test` runs the whole suite (what CI runs); `make test-fast` skips the tests marked `slow`
# (end-to-end runs, subprocess kills, real Inception / FID) and takes under 2 minutes on two cores.
.PHONY: setup smoke test test-fast bench

setup:
	./scripts/setup.sh

smoke: setup
	.venv/bin/f2d-bench generate --preset smoke --out runs/smoke
	.venv/bin/f2d-bench score runs/smoke
	.venv/bin/f2d-bench report runs/smoke -o reports/smoke

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/python benchmarks/generate_throughput.py
