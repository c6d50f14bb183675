# The two commands of the README: `make demo` (main job) and `make test`.
# Both install what they need first, so they work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test bench
install:
	# A CPU build of torch first if none is installed (a bare `torch` requirement would
	# otherwise pull a multi-GB CUDA build); keep whatever torch the user already has.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"

demo: install
	$(PY) -m softmoe demo

test: install
	$(PY) -m pytest -q -n 2 --durations=15

bench: install
	$(PY) -m softmoe bench layer --quick
