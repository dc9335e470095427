# The two commands: `make run` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing and install qflax with its pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qflax-installed

.PHONY: run test lint bench clean

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
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
