# robaudit — the front door. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TESTS  ?=

.PHONY: demo test test-fast test-slow lint bench samples dev clean golden

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# pip byte-compiles every installed module one after the other (~63 CPU-s of an 80 s clean install).
# Instead: --no-compile, then compileall on every core, skipping torch, ray and sympy (the tests
# import torch in two workers; ray in one test) but including robaudit itself, whose every child
# process would otherwise compile it again where PYTHONDONTWRITEBYTECODE is set.
COMPILE := $(BIN)/python -m compileall -q -j 0 -x '/(torch|ray|sympy)/'
PURELIB  = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e .
	$(COMPILE) $(PURELIB) robaudit > /dev/null || true  # as pip: a file that does not compile is left to import time
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e '.[test]'
	$(COMPILE) $(PURELIB) robaudit > /dev/null || true  # as pip: a file that does not compile is left to import time
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
