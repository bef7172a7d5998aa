# Two commands on a fresh machine: `make demo` (the whole chain on the embedded synthetic health system)
# and `make test`. Both create .venv and install the package with its dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

OMOP_VENV ?= .venv-omop

.PHONY: demo test install omop-env clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip check
	touch $@

install: $(BIN)/.installed

# The OMOP converter (meds_etl) pins meds 0.3.3, so it gets its own environment (docs/omop.md).
$(OMOP_VENV)/bin/.installed: converters/omop.txt
	$(PYTHON) -m venv $(OMOP_VENV)
	$(OMOP_VENV)/bin/pip install --quiet --upgrade pip
	$(OMOP_VENV)/bin/pip install --quiet -r converters/omop.txt
	$(OMOP_VENV)/bin/pip check
	touch $@

omop-env: $(OMOP_VENV)/bin/.installed

demo: $(BIN)/.installed
	$(BIN)/nextvisit demo

test: $(BIN)/.installed $(OMOP_VENV)/bin/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OMOP_VENV) nextvisit-demo
