# Set-up and the everyday commands. Everything installs into .venv, from requirements.lock: the dependency set
# CI last passed with. torch is pinned first to the CPU build that this machine's pip finds locally, so that no
# install pulls the CUDA builds onto a CPU machine.

VENV    ?= .venv
PY      := $(VENV)/bin/python
LATEST  ?= .venv-latest
TORCH   ?= torch==2.13.0
LOCK    := requirements.lock
EXTRAS  := dev,models,eval
PIPTOOLS ?= pip-tools==7.7.0

.PHONY: run demo test test-latest smoke lock lint compile-check gpu-check clean browser docs

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

run: $(VENV)/.installed        ## the main job: Gemma 3 270M -> activations -> SAE -> evaluation report
	$(PY) -m fastsae run

demo: $(VENV)/.installed       ## ground-truth recovery on a toy dictionary (synthetic, ~1.5 min)
	$(PY) -m fastsae demo

test: $(VENV)/.installed       ## the whole CPU suite (kernels through Triton's interpreter), on the locked set
	@$(MAKE) -s browser || echo "no Chromium (make browser needs apt-get as root): the browser tests will skip"
	$(PY) -m pytest -q

smoke: $(VENV)/.installed      ## the main job on the real Gemma 3 270M at smoke size (~3 min on 2 cores)
	FASTSAE_SMOKE=1 $(PY) -m pytest -q tests/test_smoke_gemma.py

# The newest releases pyproject's ranges allow (torch stays the CPU pin): a failure here means a new release
# broke us. Fix it, then `make lock`.
$(LATEST)/.installed: pyproject.toml
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

# The Triton interpreter's kernel tests (about 4 of CI's 45 minutes) run in the locked suite only: CI's time
# budget, and they exercise triton and torch, not the ranges that move (torch is pinned; a triton release
# reaches them when `make lock` takes it).
LATEST_SKIP := --ignore=tests/ops/test_kernels.py --ignore=tests/modules/test_sae_backends.py \
               --ignore=tests/ops/test_jumprelu_ste.py
test-latest: $(LATEST)/.installed  ## the suite on the newest versions the ranges allow (kernel tests aside)
	@$(MAKE) -s browser || echo "no Chromium (make browser needs apt-get as root): the browser tests will skip"
	$(LATEST)/bin/python -m pip list --format freeze 2>/dev/null | grep -Ei '^(torch|transformers|kernels|triton|numpy|sae-lens|eai-sparsify)=' || true
	$(LATEST)/bin/python -m pytest -q $(LATEST_SKIP)

lock:                          ## refresh requirements.lock: the newest versions the ranges allow, CPU torch
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIPTOOLS)"
	echo "$(TORCH)" | .venv-lock/bin/pip-compile -q --upgrade --extra dev --extra models --extra eval --extra docs \
	    --no-emit-index-url --no-emit-find-links --strip-extras --output-file $(LOCK) pyproject.toml -

browser:                       ## headless Chromium for the feature-browser tests (Debian/Ubuntu, as root)
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }

docs: $(VENV)/.installed       ## the docs site (MkDocs Material + API reference) into site/; a broken link fails
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

compile-check: $(VENV)/.installed  ## every kernel variant compiled for sm_80/sm_90 (no GPU): no spills, HGMMA
	$(PY) tests/compile_check.py --table bench/results/kernels/compile-occupancy.md

gpu-check:                     ## on a CUDA machine (its own Python, ~7.5 min): kernels vs float64, targets, sweep, capacity
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build dist *.egg-info runs site
