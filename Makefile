# make demo / make test create .venv and install everything they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO   ?= out/demo

.PHONY: demo test bench engines venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch 2.13.0 CPU first, so no CUDA torch is pulled)"
	@$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,rtx]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import torch, transformers, onnxruntime, onnx_ir, trtglm" || (echo "install failed" && exit 1)
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	@rm -rf $(DEMO)
	$(PY) scripts/demo.py $(DEMO)

bench: $(STAMP)
	$(PY) bench/export.py
	$(PY) bench/fusion.py
	$(PY) bench/build.py
	$(PY) bench/precision.py
	$(PY) bench/runtime.py
	$(PY) bench/ort_profile.py
	$(PY) bench/kernels.py
	$(PY) bench/accuracy.py

# The demo model's engine for every target of its recipe, as the CI workflow builds them.
engines: $(STAMP)
	$(PY) scripts/demo.py $(DEMO) --export-only
	@for t in sm86 sm89 sm120; do \
	  $(PY) -m trtglm build $(DEMO)/export -o out/engines/demo-glm4-fp16-$$t --recipe recipes/demo-glm4-fp16.yaml \
	    --target $$t --force || exit 1; \
	  $(PY) -m trtglm verify out/engines/demo-glm4-fp16-$$t || exit 1; \
	done
	$(PY) -m trtglm export models/tiny-glm4 -o $(DEMO)/export-fp32 --dtype fp32 --force
	@for t in sm86 sm89 sm120; do \
	  $(PY) -m trtglm build $(DEMO)/export-fp32 -o out/engines/demo-glm4-int8-$$t --recipe recipes/demo-glm4-int8.yaml \
	    --target $$t --force || exit 1; \
	  $(PY) -m trtglm verify out/engines/demo-glm4-int8-$$t || exit 1; \
	done

clean:
	rm -rf $(VENV) out .bench
