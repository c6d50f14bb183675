"""torch.compile(fullgraph=True) captures each layer in one graph (no graph breaks) and gives
the eager output. The aot_eager backend checks capture + functionalisation in under a second
per layer; the inductor run (C++ codegen, ~10-25 s on 2 cores) is marked slow.

Device-agnostic (tests/conftest.py): layer and input on the `device` under test. aot_eager
needs no compiler; inductor needs a C++ compiler on the CPU and triton on CUDA, and is skipped
with that reason where the device's backend is unavailable."""
import pytest
import torch
from torch.utils._triton import has_triton

from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

LAYERS = {
    "soft": lambda: SoftMoE(8, 4, slots_per_expert=2, hidden_dim=16),
    "tokens": lambda: TokensChoiceMoE(8, 4, hidden_dim=16, k=2, capacity_factor=1.0),
    "experts": lambda: ExpertsChoiceMoE(8, 4, hidden_dim=16, group_size=2),
}


def check_compiled(kind, backend, atol, device, masks=(False, True)):
    torch._dynamo.reset()
    layer = LAYERS[kind]().eval().to(device)
    x = torch.randn(2, 6, 8, generator=torch.Generator(device=device).manual_seed(0), device=device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for m in (mask if masked else None for masked in masks):
        torch.testing.assert_close(compiled(x, m), layer(x, m), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fullgraph_aot_eager(kind, device):
    # aot_eager runs the captured graph with eager kernels: the output must be bitwise equal.
    check_compiled(kind, "aot_eager", atol=0, device=device)


@pytest.mark.slow
def test_fullgraph_inductor(device):
    if device.type == "cuda" and not has_triton():
        pytest.skip("inductor on CUDA needs triton, which is not installed")
    # Inductor reorders float32 reductions: 1e-5 absolute on O(1) outputs (fp32 on CUDA too:
    # TF32 is off by default for matmuls). Masked input only (one compile per layer; the
    # masked path runs every op of the unmasked one).
    for kind in LAYERS:
        check_compiled(kind, "inductor", atol=1e-5, device=device, masks=(True,))
