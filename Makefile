# The two commands a new user needs: `make smoke` and `make test`. Both set up .venv first.
.PHONY: setup smoke test bench

setup:
	./scripts/setup.sh

smoke: setup
	.venv/bin/f2d-bench generate --preset smoke --out runs/smoke
	.venv/bin/f2d-bench score runs/smoke
	.venv/bin/f2d-bench report runs/smoke -o reports/smoke

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/generate_throughput.py
