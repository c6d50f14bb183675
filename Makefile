# The two commands of the README: `make demo` (main job) and `make test`.
# Both install what they need first, so they work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
HAVE_OPTIONAL = import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("timm", "torchvision", "soft_moe_pytorch", "soft_moe")))
TORCHVISION_FOR_TORCH = import torch; print("0.%d.*" % (int(torch.__version__.split(".")[1]) + 15))

# timm's own model tests ship in its sdist (not in the wheel): tests/models/timm_suite.py runs
#    them on our models from this folder (sha256-pinned; nothing of timm's is committed).
TIMM_TESTS ?= $(or $(SOFTMOE_TIMM_TESTS),$(HOME)/.cache/softmoe/timm-tests)

.PHONY: install demo test lint bench

# 1. torch 2.14.1 with its torchvision 0.29.1 if no torch is installed (both from the pinned
#    wheels; a bare `torch` requirement would pull whatever is newest). torchvision must be the
#    release built for that torch: timm's feature extraction and FX tests import it, and PyPI's
#    torchvision cannot load its ops beside the CPU-only torch 2.13 wheel. Whatever torch the
#    user already has is kept.
# 2. The package with its dev extras (pytest, ruff, ...).
# 3. Optional parts the tests and benchmarks exercise, with --no-deps so pip never swaps
#    torch: timm (interop tests), the torchvision release built for the installed torch
#    (timm needs it; 0.29 <-> torch 2.14, 0.28 <-> 2.13), and the two PyPI Soft MoE ports that
#    `softmoe bench layer` compares against.
# 4. timm's sdist, for its model tests (TIMM_TESTS above).
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) -e ".[dev]"
	@$(PY) -c '$(HAVE_OPTIONAL)' || $(PIP) --no-deps timm==1.0.31 soft-moe-pytorch==0.1.9 soft-moe==0.0.1 \
	  "torchvision==$$($(PY) -c '$(TORCHVISION_FOR_TORCH)')"
	@ls "$(TIMM_TESTS)"/timm-1.0.31.tar.gz >/dev/null 2>&1 || $(PY) -m pip download -q --disable-pip-version-check \
	  --no-deps --no-binary :all: timm==1.0.31 -d "$(TIMM_TESTS)" >/dev/null 2>&1 \
	  || echo "note: timm's sdist could not be had; tests/models/test_timm_suite.py will skip"

demo: install
	$(PY) -m softmoe demo

# The linter (its rules: [tool.ruff] in pyproject.toml); `make test` runs it first.
lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=15

bench: install
	$(PY) -m softmoe bench layer --quick
