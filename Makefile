# pixtok: `make test` and `make serve` install whatever is missing, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
EXTRAS ?= test
STAMP := $(VENV)/.installed-$(EXTRAS)
# a pip index for torch alone, e.g. PyTorch's CPU wheels for a CPU container (empty: the default)
TORCH_INDEX ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests and the default models need, by the command or path that shows them
# (chromium: the browser tests drive Debian's build; playwright's own browser download is not used)
APT_NEEDS := dataset-fashion-mnist:/usr/share/datasets/fashion-mnist default-jre-headless:java \
	chromium:chromium

.PHONY: install system-deps test test-fast test-reliability lint serve stop clean

install: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) -e '.[$(EXTRAS)]'
	@# taming-transformers only checks the VQGAN converter's parity in the tests (its deps are not
	@# needed for that, and a served image needs none of it)
	$(if $(filter test,$(EXTRAS)),$(PIP) --no-deps taming-transformers-rom1504==0.0.6)
	@touch $@

system-deps:
	@missing=""; for need in $(APT_NEEDS); do pkg=$${need%%:*}; what=$${need#*:}; \
	  if [ "$${what:0:1}" = / ]; then [ -e "$$what" ] || missing="$$missing $$pkg"; \
	  else command -v "$$what" >/dev/null || missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

test: install system-deps lint
	$(BIN)/pytest

# the unit tests alone (no TorchServe, Gradio, browser or CLI training runs): a couple of minutes
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not serve and not slow and not reliability"

# faults and overload against real servers (docs/reliability.md); about five minutes on 2 cores
test-reliability: install system-deps
	$(BIN)/pytest -m reliability

# the shipped default models behind TorchServe, and the Gradio page (archives built when missing)
serve: install system-deps
	$(BIN)/pixtok serve $(SERVE_ARGS)

stop: install
	$(BIN)/pixtok serve --stop

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
