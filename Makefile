# robaudit — the front door. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TESTS  ?=

.PHONY: demo test test-fast test-slow lint bench samples dev clean golden

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# --no-compile: pip would byte-compile every installed module (torch, ray, scikit-learn: ~50 s of a
# clean install); Python compiles the few a run imports on first use and keeps them.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e '.[test]'
	touch $@ $(VENV)/.runtime

dev: $(VENV)/.dev                     ## install robaudit with test/benchmark extras

demo: $(VENV)/.runtime                ## install and audit bundled sample models
	$(BIN)/robaudit inspect sample_models/mobilenet_se.onnx
	$(BIN)/robaudit bound sample_models/mobilenet_se.onnx --epsilon 0.5
	$(BIN)/robaudit inject sample_models/lenet.onnx --crash 1 --search worst --epsilon 5 \
		--inputs sample_models/lenet_inputs.npz --labels sample_models/lenet_inputs.npz --quiet

test: $(VENV)/.dev                    ## install and run lint + the whole test suite (one worker per core)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile $(if $(TESTS),-k "$(TESTS)")

test-fast: $(VENV)/.dev               ## the library tests only: no exports, no CLI subprocesses
	$(BIN)/python -m pytest -q -m "not slow and not export and not cli" $(if $(TESTS),-k "$(TESTS)")

test-slow: $(VENV)/.dev               ## the long soundness campaigns
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.dev                    ## ruff and mypy (types checked: pyproject.toml [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

bench: $(VENV)/.dev                   ## speed and tightness benchmarks (ratios, same process)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

golden: $(VENV)/.dev                  ## rewrite tests/golden/ after a deliberate change of the bounds
	$(BIN)/python tests/golden/regenerate.py

samples: $(VENV)/.dev                 ## regenerate sample_models/ from their scripts
	$(BIN)/python sample_models/make_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
