# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Every target installs first; a second `make install` with nothing to do returns in seconds.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.foldkit-installed

# The demo keeps its artifacts in demo/ (folds/ models/ oof/ submissions/ inside), so it never
# overwrites the folds of a real run in the project folder.
DEMO_DATA ?= data/demo
DEMO_WORK ?= demo
# DEMO_TRAINVAL images split 3/4 train + 1/4 validate, plus a test set of DEMO_TRAINVAL/4:
# 1500 + 500 + 500 = 2500 images by default.
DEMO_TRAINVAL ?= 2000

.PHONY: install demo test lint format clean-demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(PY) -m foldkit.demo --data-dir $(DEMO_DATA) --work-dir $(DEMO_WORK) --n-trainval $(DEMO_TRAINVAL)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_WORK)
