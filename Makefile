# Two entry points (see README): `make demo` (the video job on the shipped sample scenes and the
# embedded probe, offline, local Ray: dense, then with SparseVLM) and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

# On a machine without an NVIDIA driver we pin the CPU build of torch first, so that
# resolving `torch>=2.6` later installs nothing more (no multi-GB CUDA download).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,probe]'
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/caption_videos.py --method none
	$(PY) jobs/caption_videos.py

test: $(VENV)/.installed
	$(PY) -m pytest -q
