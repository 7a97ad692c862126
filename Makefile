# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepvis-installed

.PHONY: setup demo test test-benchmarks bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/deepvis demo

test: setup
	bash scripts/test.sh

# the slow quality runs marked @pytest.mark.benchmark (left out of `make test`)
test-benchmarks: setup
	bash scripts/test.sh -m benchmark

bench: setup
	$(PY) bench/optimize.py

clean:
	rm -rf $(VENV) atlas artifacts
