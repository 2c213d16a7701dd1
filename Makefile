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

.PHONY: install system-deps test test-fast test-reliability lint serve stop clean image gpu-check \
	image-deps base-image test-container

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

# one lent GPU, 9 minutes: install from this repository's files (keeping the machine's CUDA
# torch), serve every default model on CUDA through TorchServe and KServe, measure MFU, then the
# study if time is left; JSON in $(OUT)/gpu_check.json (docs/serving.md "On a GPU")
OUT ?= gpu-check
gpu-check:
	scripts/gpu_check.sh $(OUT) $(GPU_CHECK_ARGS)

# --- the CPU serving image (README "Containers") ------------------------------------------------
# docker where an engine answers, podman otherwise (this machine: see serving/deploy/containers.conf)
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE ?= pixtok:cpu
# the Debian base, made from Debian's own packages once (no image registry needed)
BASE_IMAGE ?= pixtok-base:bookworm
# the mirror this machine's own apt sources take bookworm from (empty until `apt-get update` ran,
# or on a machine without a bookworm source: then give DEBIAN_MIRROR=URL)
DEBIAN_MIRROR ?= $(shell apt-get indextargets --format '$$(REPO_URI) $$(CODENAME)' 2>/dev/null | \
	awk '$$2 == "bookworm" { print $$1; exit }')
# a folder of wheels pip takes torch's CPU build from (default: pip's own find-links, if a folder);
# empty: give TORCH_INDEX=https://download.pytorch.org/whl/cpu instead
TORCH_WHEELS ?= $(shell d=$$($(PYTHON) -m pip config get global.find-links 2>/dev/null); [ -d "$$d" ] && echo "$$d")
# a CA bundle for pip inside the build (a TLS-intercepting network); a build secret, not a layer
PIP_CERT ?=
comma := ,
ifeq ($(ENGINE),podman)
export CONTAINERS_CONF ?= $(CURDIR)/serving/deploy/containers.conf
BUILD_FLAGS := --isolation chroot --format docker
else
BUILD_FLAGS :=
endif

# debootstrap for the base; with podman also runc (crun fails on this machine) and podman with
# its recommended networking and storage helpers
image-deps:
	@need=debootstrap; [ "$(ENGINE)" = podman ] && need="$$need podman runc"; missing=""; \
	for pkg in $$need; do command -v $$pkg >/dev/null || [ -x /usr/sbin/$$pkg ] || \
	  missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi

base-image: image-deps
	@if $(ENGINE) image inspect $(BASE_IMAGE) >/dev/null 2>&1; then \
	  echo "base image $(BASE_IMAGE): present"; else \
	  root=$$(mktemp -d) && trap '$(SUDO) rm -rf "$$root"' EXIT && \
	  [ -n "$(DEBIAN_MIRROR)" ] || { echo "no bookworm source in this machine's apt sources" \
	    "(run apt-get update, or give DEBIAN_MIRROR=URL)" >&2; exit 2; } && \
	  echo "debootstrap bookworm -> $(BASE_IMAGE) from $(DEBIAN_MIRROR)" && \
	  $(SUDO) debootstrap --variant=minbase bookworm "$$root" $(DEBIAN_MIRROR) >/dev/null && \
	  $(SUDO) rm -rf "$$root"/var/lib/apt/lists/* "$$root"/var/cache/apt/archives/*.deb && \
	  $(SUDO) tar -C "$$root" -c . | $(ENGINE) import - $(BASE_IMAGE); fi

image: base-image
	$(ENGINE) build $(BUILD_FLAGS) -t $(IMAGE) --build-arg VARIANT=cpu \
	  --build-arg BASE=$(BASE_IMAGE) $(if $(TORCH_INDEX),--build-arg TORCH_INDEX=$(TORCH_INDEX)) \
	  $(if $(TORCH_WHEELS),--build-context wheels=$(TORCH_WHEELS)) \
	  $(if $(PIP_CERT),--secret id=pip_cert$(comma)src=$(PIP_CERT)) .

# start the image, wait for its HEALTHCHECK, one real request per default model and one to the page
test-container: image install
	ENGINE=$(ENGINE) IMAGE=$(IMAGE) $(BIN)/python .ci/test-container

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
