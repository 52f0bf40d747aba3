# Set-up and the two everyday commands. Everything installs into .venv.
# torch is pinned first to the CPU build that this machine's pip finds
# locally, so that no install pulls the CUDA builds onto a CPU machine.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: run demo test lint compile-check gpu-check clean browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.installed-models: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,models,eval]"
	touch $@

run: $(VENV)/.installed-models  ## the main job: Gemma 3 270M -> activations -> SAE -> evaluation report
	$(PY) -m fastsae run

demo: $(VENV)/.installed       ## ground-truth recovery on a toy dictionary (synthetic, ~1.5 min)
	$(PY) -m fastsae demo

test: $(VENV)/.installed       ## the whole CPU suite (kernels through Triton's interpreter)
	@$(MAKE) -s browser || echo "no Chromium (make browser needs apt-get as root): the browser tests will skip"
	$(PY) -m pytest -q

browser:                       ## headless Chromium for the feature-browser tests (Debian/Ubuntu, as root)
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

compile-check: $(VENV)/.installed  ## every kernel variant compiled for sm_80/sm_90 (no GPU): no spills, HGMMA
	$(PY) -m bench.compile_check --table bench/results/compile-occupancy.md

gpu-check:                     ## on a CUDA machine (its own Python): compiled kernel tests + quick benchmark
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info runs
