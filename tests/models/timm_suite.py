"""timm's own model tests (`tests/test_models.py` of huggingface/pytorch-image-models) run on softmoe's models.

Source: the PyPI sdist `timm-1.0.31.tar.gz` (sha256 pinned in `SDIST_SHA256`), which ships timm's tests;
the file is `timm-1.0.31/tests/test_models.py`, git blob `TEST_MODELS_BLOB` (`git hash-object`) of
github.com/huggingface/pytorch-image-models, tag v1.0.31 (`git log --find-object=<blob>` names the
upstream commit). timm's code is never committed here: `find_sdist` takes the sdist from the cache
folder `$SOFTMOE_TIMM_TESTS` (default `~/.cache/softmoe/timm-tests`), fetching it with
`pip download` if it is missing (`make install` does that), and verifies its sha256.

This module is also the pytest plugin (`-p timm_suite`) of that run. timm's file parametrises its tests
with `timm.list_models(...)` at import; the plugin, before collection,
- registers our models in timm (`softmoe.models.register_timm_models()`, the documented call),
- replaces `timm.list_models` by `suite_list_models`: the same filter / exclude / module / pretrained
  semantics, over our suite's names only (`SOFTMOE_TIMM_SUITE_MODELS`). timm sorts models into its
  groups by name (`NON_STD_FILTERS`: "transformer / hybrid models [with] spatial output", `vit_*`) and
  module (`FEAT_INTER_FILTERS`: models with forward_intermediates, `vision_transformer`); ours are
  ViTs with token outputs, so each is matched as timm's `vit_<name>` in module `vision_transformer`,
- deselects timm's tests of timm's own models (literal names such as `resnet18`) and the TorchScript
  tests (`TORCHSCRIPT_TESTS`: our models are not scriptable, see docs/models.md; pinned by
  tests/models/test_timm_suite.py::test_torchscript_not_supported).
timm's assertions are not touched.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from softmoe._io import sha256_file

TIMM_VERSION = "1.0.31"
SDIST = f"timm-{TIMM_VERSION}.tar.gz"
SDIST_SHA256 = "baa0b333339c46d3d6d4965d99b69f5053afed71210e8f433d7ea5ee6a18f0ec"
TEST_MODELS_BLOB = "267d3e8f1708650051abd160e4ae251fc16bdb31"
# What the run needs from the sdist (timm's conftest only defines fixtures).
MEMBERS = ("tests/__init__.py", "tests/conftest.py", "tests/test_models.py")
SUITE_MODELS = ("vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro", "vit_ti16", "soft_moe_ti16")
TORCHSCRIPT_TESTS = ("test_model_forward_torchscript", "test_model_forward_fx_torchscript")


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTMOE_TIMM_TESTS") or Path.home() / ".cache" / "softmoe" / "timm-tests")


def find_sdist(download: bool = True, timeout: float = 120) -> Path | None:
    """The verified sdist in `cache_dir()`, fetched from PyPI if missing and `download`; None if it cannot
    be had (offline). A file with another sha256 is a ValueError (never run unverified code)."""
    path = cache_dir() / SDIST
    if not path.exists() and download:
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"timm=={TIMM_VERSION}", "-d", str(path.parent)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
        except (subprocess.SubprocessError, OSError):
            pass
    if not path.exists():
        return None
    if sha256_file(path) != SDIST_SHA256:
        raise ValueError(f"{path}: sha256 {sha256_file(path)} != pinned {SDIST_SHA256}; delete it to re-fetch")
    return path


def extract(sdist: Path) -> Path:
    """`MEMBERS` of the sdist under `cache_dir()/timm-<version>/` (once); returns that folder."""
    root = sdist.parent / f"timm-{TIMM_VERSION}"
    if not all((root / m).exists() for m in MEMBERS):
        with tarfile.open(sdist) as tar:
            tar.extractall(sdist.parent, members=[tar.getmember(f"timm-{TIMM_VERSION}/{m}") for m in MEMBERS],
                           filter="data")
    (root / "pytest.ini").write_text("[pytest]\n")  # isolate the run from our pyproject's pytest options
    return root


def suite_command(root: Path, models=SUITE_MODELS, extra=()) -> tuple[list[str], dict]:
    """(argv, env) that run timm's test_models.py from `root` on `models` with this plugin."""
    here = str(Path(__file__).resolve().parent)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, here]), "SOFTMOE_TIMM_SUITE_MODELS": ",".join(models)}
    env.pop("PYTEST_XDIST_WORKER", None)
    argv = [sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"), "--rootdir", str(root), "-p", "timm_suite",
            "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "-rs",
            str(root / "tests" / "test_models.py"), *extra]
    return argv, env


# -- the plugin ------------------------------------------------------------------------------
def _suite_names() -> list[str]:
    return [n for n in os.environ.get("SOFTMOE_TIMM_SUITE_MODELS", ",".join(SUITE_MODELS)).split(",") if n]


def _as_list(patterns) -> list[str]:
    if not patterns:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def suite_list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                      include_tags=None):
    """`timm.list_models` over our suite's names: `filter` patterns matched against `vit_<name>` (timm's
    ViT group), `exclude_filters` against the name and `vit_<name>`, `module` as `vision_transformer`.
    None of ours has pretrained weights (timm would list none for `pretrained=True`)."""
    from timm.models import _registry

    if pretrained:
        return []
    out = []
    for name in _suite_names():
        alias = name if name.startswith("vit_") else f"vit_{name}"
        include = _as_list(filter)
        if include and not any(fnmatch.fnmatch(alias, p) or fnmatch.fnmatch(name, p) for p in include):
            continue
        if any(fnmatch.fnmatch(n, p) for p in _as_list(exclude_filters) for n in (name, alias)):
            continue
        modules = _as_list(module)
        if modules and not any(fnmatch.fnmatch("vision_transformer", m) for m in modules):
            continue
        if name_matches_cfg and name not in _registry._model_pretrained_cfgs:
            continue
        out.append(name)
    return out


def pytest_configure(config):
    import timm

    from softmoe.models import register_timm_models

    register_timm_models()
    timm.list_models = suite_list_models


def pytest_collection_modifyitems(config, items):
    names = set(_suite_names())
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        ours = params.get("model_name") in names and item.originalname not in TORCHSCRIPT_TESTS
        (keep if ours else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
