"""timm's own tests/test_models.py on softmoe's models (source, pin and method: tests/models/timm_suite.py)."""
import re
import subprocess

import pytest
import torch

import timm_suite

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.cpu_only  # timm's own suite, in a subprocess, on the CPU

# The models whose timm contract is checked here: every `*_micro` model, and the two 224-px models
# in a test of their own (slow: soft_moe_ti16, 226M parameters, takes about 175 s on 2 busy cores, 132 s of it
# timm's test_prune_intermediate_layers_contract, which for each of the 12 blocks deep-copies the model 3 times
# and runs a forward + backward of a pruned copy at 224 px; vit_ti16 takes about 43 s).
MICRO = ("vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro")
TI16 = ("vit_ti16", "soft_moe_ti16")


def _run_timm_suite(models, timeout):
    sdist = timm_suite.find_sdist()
    if sdist is None:
        pytest.skip(f"timm's sdist {timm_suite.SDIST} is not in {timm_suite.cache_dir()} and PyPI cannot be "
                    f"reached (make install fetches it)")
    argv, env = timm_suite.suite_command(timm_suite.extract(sdist), models=models, extra=["-n", "0", "-rA"])
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and not re.search(r"\d+ (failed|errors?)\b", summary), summary
    passed = [line for line in run.stdout.splitlines() if line.startswith("PASSED ")]
    for name in models:  # every model ran (a filter that matched nothing would pass vacuously)
        assert any(f"[{name}" in line for line in passed), f"no timm test passed for {name}:\n{run.stdout[-3000:]}"


@pytest.mark.slow
def test_timm_test_models_pass():
    _run_timm_suite(MICRO, timeout=300)


@pytest.mark.slow
def test_timm_test_models_pass_ti16():
    _run_timm_suite(TI16, timeout=1200)


def test_suite_list_models_semantics(monkeypatch):
    monkeypatch.setenv("SOFTMOE_TIMM_SUITE_MODELS", "vit_micro,soft_moe_micro")
    from softmoe.models import register_timm_models

    register_timm_models()
    ls = timm_suite.suite_list_models
    assert ls() == ["vit_micro", "soft_moe_micro"]
    assert ls(filter=["vit_*"]) == ["vit_micro", "soft_moe_micro"]  # both count as timm's ViTs
    assert ls(exclude_filters=["soft_*"]) == ["vit_micro"]
    assert ls(module=["resnet"]) == [] and ls(module=["vision_transformer"]) == ["vit_micro", "soft_moe_micro"]
    assert ls(pretrained=True) == []


def test_torchscript_not_supported():
    """Pinned reason for skipping timm's TorchScript tests: our MoE layers are not scriptable."""
    from softmoe.models import create_model

    model = create_model("soft_moe_micro").eval()
    with pytest.raises(Exception):  # noqa: B017 -- any TorchScript frontend error; fails if scripting starts working
        torch.jit.script(model)
