"""Whole models (a) on the meta device: every registered model runs its forward there, and
torch's FlopCounterMode counts the same FLOPs on that forward as the zoo profiler's formula
(docs/design.md §3: multiply-add = 2, matmuls and einsums only), for every registry entry and
every row of the paper's Table 8; (b) with activation-checkpointed blocks: the same outputs,
gradients, auxiliary losses and routing metrics as without."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from softmoe import collect_aux_loss, collect_metrics, record_routing
from softmoe.bench.paper import PAPER_CLASSES, TABLE8
from softmoe.models import count_flops, create_model, get_config, list_models
from softmoe.models.vit import build_model


def meta_flops(cfg):
    """(FLOPs FlopCounterMode counts on a meta forward, the batch) for the smallest batch the
    model takes (one routing group)."""
    with torch.device("meta"):
        model = build_model(cfg).eval()
    moe = [b.mlp for b in model.blocks if hasattr(b.mlp, "num_experts")]
    B = getattr(moe[0], "group_size", 1) if moe else 1
    x = torch.empty(B, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
    # The math SDPA backend decomposes attention into matmuls, which FlopCounterMode counts.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        y = model(x)
    assert y.shape == (B, cfg.num_classes) and y.device.type == "meta"
    return fc.get_total_flops(), B


# Every entry, at its registry config. The L and H sizes take a second or more each on 2 cores.
ENTRIES = [pytest.param(n, marks=pytest.mark.slow) if "_l" in n or "_h" in n else n for n in list_models()]


@pytest.mark.parametrize("name", ENTRIES)
def test_meta_forward_flops_equal_the_profiler(name):
    cfg = get_config(name)
    got, B = meta_flops(cfg)
    assert got == count_flops(cfg, batch_size=B)


@pytest.mark.parametrize("row", TABLE8, ids=[r[0] for r in TABLE8])
def test_meta_forward_flops_of_table8_rows(row):
    _, name, overrides, *_ = row
    cfg = get_config(name, num_classes=PAPER_CLASSES, **overrides)
    got, B = meta_flops(cfg)
    assert got == count_flops(cfg, batch_size=B)


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward (non-reentrant checkpoint)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def training_step(model, x, y):
    with record_routing(model):
        logits = model(x)
        aux = collect_aux_loss(model)
        loss = nn.functional.cross_entropy(logits, y) + aux
        loss.backward()
    metrics = {k.replace(".block", ""): v for k, v in collect_metrics(model).items()}
    grads = {n.replace(".block", ""): p.grad for n, p in model.named_parameters()}
    return logits.detach(), aux.detach(), metrics, grads


@pytest.mark.parametrize("name", ["soft_moe_micro", "tc_moe_micro", "ec_moe_micro"])
def test_checkpointed_blocks_equal_plain_blocks(name, device):
    torch.manual_seed(0)
    model = create_model(name).train().to(device)
    ckpt = copy.deepcopy(model)
    ckpt.blocks = nn.ModuleList(Checkpointed(b) for b in ckpt.blocks)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g, device=device)
    y = torch.randint(0, 10, (4,), generator=g, device=device)
    torch.manual_seed(5)  # the same routing noise in both (checkpoint replays it in the recompute)
    plain = training_step(model, x, y)
    torch.manual_seed(5)
    again = training_step(ckpt, x, y)
    torch.testing.assert_close(again[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(again[1], plain[1], rtol=0, atol=0)
    if name == "tc_moe_micro":
        assert plain[1] > 0  # Tokens Choice: a real auxiliary loss
    assert again[2] == plain[2] and plain[2]
    assert again[3].keys() == plain[3].keys()
    for key, want in plain[3].items():
        torch.testing.assert_close(again[3][key], want, rtol=1e-6, atol=1e-7, msg=key)
