# Two commands on a fresh machine: `make run` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: install
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi demo setup
	@echo "Serving on http://localhost:$(PORT)  (Ctrl-C stops)"
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO=1 PORT=$(PORT) $(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache
