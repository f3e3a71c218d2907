# Two commands on a fresh machine: `make run` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
# make run listens on this machine only; HOST=0.0.0.0 make run serves the network
HOST   ?= 127.0.0.1
DEMO_JS := app/demo/node_modules/.package-lock.json
DOCS_JS := app/api/swagger/node_modules/.package-lock.json

.PHONY: install run test bench clean

install: $(VENV)/.installed $(DEMO_JS) $(DOCS_JS)

# The demo page's socket.io client, served by the app itself (no CDN): installed again when
# node_modules is missing or package-lock.json changed.
$(DEMO_JS): app/demo/package.json app/demo/package-lock.json
	npm ci --prefix app/demo --no-audit --no-fund --loglevel=error
	touch $@

# Swagger UI for /docs, served by the app itself (no CDN); --ignore-scripts: swagger-ui-dist's
# dependency @scarf/scarf would otherwise run an install-time analytics script.
$(DOCS_JS): app/api/swagger/package.json app/api/swagger/package-lock.json
	npm ci --prefix app/api/swagger --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.py setup.cfg clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# the server and the client package (clients/python: ChatClient, workspace-chat), both
	# editable; setuptools' banner about editable installs is silenced
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --no-deps -e . -e ./clients/python
	touch $@

run: install
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi demo setup
	@echo "Serving on http://localhost:$(PORT)  (Ctrl-C stops)"
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO=1 HOST=$(HOST) PORT=$(PORT) $(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# Benchmarks (never part of `make test`): ours against a bare Flask-SocketIO server, see
# bench/RESULTS.md. BENCH_ARGS passes options, e.g. BENCH_ARGS="--database postgresql".
bench: install
	npm ci --prefix bench --no-audit --no-fund --loglevel=error
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache
