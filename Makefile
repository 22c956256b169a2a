# Conveniences over the scripts; the README's commands work without make.
.PHONY: demo test install bench

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

install:
	bash systemd/install.sh

bench:
	.venv/bin/python bench/bench_pipeline.py
