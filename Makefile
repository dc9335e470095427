# The two commands: `make run` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing and install qflax with its pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pytest-xdist workers for `make test` (the CI machine has 2 cores).
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.qflax-installed

.PHONY: run test lint bench data notebooks clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qflax needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# The main job: train the mnist5k CNN in float and in W4A4 (fresh workdirs under runs/), then
# print both per-layer summaries and the two test accuracies side by side.
run: $(STAMP)
	@rm -rf runs/mnist5k-fp runs/mnist5k-w4a4
	@start=$$(date +%s); \
	$(BIN)/qflax train --config experiments/mnist5k/fp.py --workdir runs/mnist5k-fp && \
	$(BIN)/qflax train --config experiments/mnist5k/w4a4.py --workdir runs/mnist5k-w4a4 && \
	$(BIN)/qflax summary --workdir runs/mnist5k-fp --workdir runs/mnist5k-w4a4 && \
	echo "main job wall time: $$(( $$(date +%s) - start )) s"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The research notebooks (notebooks/README.md): every notebook executed top to bottom in its full
# variant, written as HTML beside it for reading (git-ignored); ~15 min in all on the 2-core CPU
# (measured while a sweep shared it). Installs the `notebooks` extra (Jupyter, nbconvert) and a
# "python3" kernel spec of .venv's Python, found first through JUPYTER_PATH: the notebooks run on
# this virtualenv whatever kernels the user has.
NB_STAMP := $(VENV)/.qflax-notebooks-installed
NB_JUPYTER := $(VENV)/share/jupyter

$(NB_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,notebooks]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 --display-name "Python 3 (qflax)"
	@touch $(NB_STAMP)

notebooks: $(NB_STAMP)
	JUPYTER_PATH=$(NB_JUPYTER) JAX_PLATFORMS=cpu $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=3600 \
		--output-dir notebooks notebooks/*.ipynb

# Benchmarks (tables in benchmarks/RESULTS.md; ~4 + ~5 + ~5 + ~4 min on 2 cores). The anchors (qwix,
# AQT: the `bench` extra) get their own virtualenv, .venv-bench, so .venv stays as pinned.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.qflax-bench-installed

$(BENCH_STAMP): pyproject.toml
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e ".[bench]"
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/quantizers.py
	$(BIN)/python benchmarks/train_step.py
	$(BENCH_VENV)/bin/python benchmarks/anchors.py
	$(BIN)/python benchmarks/inference.py

# Extra real data (not needed by `make run` or `make test`): Fashion-MNIST's four IDX files from
# the Debian package dataset-fashion-mnist, installed in /usr/share/datasets/fashion-mnist
# (apt-get as root, or through sudo). `qflax.data.load("fashion_mnist")` reads them there.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "dataset-fashion-mnist is installed: $$(dpkg -L dataset-fashion-mnist | grep -c 'ubyte.gz$$') IDX files in /usr/share/datasets/fashion-mnist"; \
	else \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
