# make demo / make test create .venv and install everything they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
DEMO   ?= out/demo
# An AVX2 CPU without VNNI, less the features QEMU cannot emulate (it would warn about each)
HASWELL := Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid

.PHONY: demo test fuzz bench engines engines-glm-4-9b venv lock qemu clean

venv: $(STAMP)

# The versions constraints.txt names (tested together); pyproject.toml keeps the ranges for library users.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch 2.13.0 CPU first, so no CUDA torch is pulled; versions from constraints.txt)"
	@$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	@$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,rtx]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import torch, transformers, onnxruntime, onnx_ir, trtglm" || (echo "install failed" && exit 1)
	@rm -f $(VENV)/.installed-* && touch $@

# The integer-GEMM tests run again on an emulated x86 CPU with AVX2 and no VNNI, whatever CPU this is.
test: $(STAMP) qemu
	$(PY) -m pytest -q
	@if command -v qemu-x86_64 >/dev/null && [ "$$(uname -m)" = x86_64 ]; then \
	  echo "tests/test_integer_gemm.py on an emulated AVX2 CPU without VNNI (qemu-x86_64 -cpu Haswell)"; \
	  TRTGLM_EMULATED_CPU=haswell qemu-x86_64 -cpu $(HASWELL) $(PY) -m pytest -q -p no:cacheprovider tests/test_integer_gemm.py; \
	else echo "qemu-x86_64 not found: the emulated AVX2 run is skipped (apt-get install qemu-user)"; fi

# The input fuzzers for FUZZ_MINUTES, in rounds of new random examples (FUZZ_EXAMPLES per property and round;
# properties that run a command take a twentieth). A failure stops the run and prints its input: add it to
# tests/test_fuzz.py as an @example, then fix it.
FUZZ_MINUTES ?= 60
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	@end=$$(( $$(date +%s) + 60 * $(FUZZ_MINUTES) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do round=$$((round + 1)); echo "fuzz round $$round"; \
	  HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -x tests/test_fuzz.py || exit 1; done; \
	echo "fuzz: $$round rounds in $(FUZZ_MINUTES) minutes, nothing found"

# qemu-user where apt is there and we may use it; its absence only skips the emulated run.
qemu:
	@command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || ! command -v apt-get >/dev/null || \
	  [ "$$(id -u)" != 0 ] || { echo "installing qemu-user (apt)"; apt-get install -y -q qemu-user >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q qemu-user >/dev/null 2>&1; } || \
	  echo "apt could not install qemu-user"; }

# constraints.txt anew: the newest versions pyproject.toml's ranges admit today, in a fresh venv. Then `make test`.
lock:
	@rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	@.lock-venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	@.lock-venv/bin/pip install -q --disable-pip-version-check '.[dev,rtx]' 2>&1 | grep -v "is ignored" || true
	@{ echo "# Tested versions: make installs these. Regenerate with 'make lock' (then make test)."; \
	  .lock-venv/bin/pip freeze --exclude trtglm --exclude torch | sort -f; } > constraints.txt
	@rm -rf .lock-venv
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages"

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
	$(PY) bench/moe.py
	$(PY) bench/serve.py

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

# GLM-4-9B-0414 in fp16 and int4 for sm89, in stages within the recipes' 12 GiB (downloads the checkpoint from the
# Hugging Face hub; about 80 GB of disk), as the CI workflow's 9B jobs build them.
GLM9B := zai-org/GLM-4-9B-0414
engines-glm-4-9b: $(STAMP)
	$(PY) -m trtglm export $(GLM9B) -o out/export-glm-4-9b-0414-fp16 --dtype fp16 --no-validate --force
	$(PY) -m trtglm build out/export-glm-4-9b-0414-fp16 -o out/engines/glm-4-9b-0414-fp16-sm89 \
	  --recipe recipes/glm-4-9b-0414-fp16.yaml --target sm89 --force
	$(PY) -m trtglm verify out/engines/glm-4-9b-0414-fp16-sm89
	rm -rf out/export-glm-4-9b-0414-fp16
	$(PY) -m trtglm export $(GLM9B) -o out/export-glm-4-9b-0414-fp32 --dtype fp32 --no-validate --force
	$(PY) -m trtglm build out/export-glm-4-9b-0414-fp32 -o out/engines/glm-4-9b-0414-int4-sm89 \
	  --recipe recipes/glm-4-9b-0414-int4.yaml --target sm89 --force
	$(PY) -m trtglm verify out/engines/glm-4-9b-0414-int4-sm89
	rm -rf out/export-glm-4-9b-0414-fp32

clean:
	rm -rf $(VENV) out .bench .lock-venv
