"""The seam between the layers and their components (docs/design.md §7): every layer calls its
experts as a module — a custom or converted experts module is run as it is, never bypassed —
each component runs its own fast path, and softmoe/layers has no import cycle.

Device-agnostic (tests/conftest.py): layers, experts and inputs on the `device` under test,
the float64 references computed there; the buffer-pool test is `cpu_only` (the pools serve
CPU tensors only)."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from layers_reference import assert_close64, gelu_exact, randomize_, soft_moe_reference
from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.layers import Experts, functional
from softmoe.models.timm_interop import MlpExperts

D, E, P, H, B, N = 6, 4, 2, 10, 3, 5


def tokens(device, seed=1, dtype=torch.float64):
    """Tokens (B, N, D) on `device`, drawn there."""
    return torch.randn(B, N, D, generator=torch.Generator(device=device).manual_seed(seed), dtype=dtype,
                       device=device)


class CountingExperts(nn.Module):
    """An experts module that is not an `Experts`: a linear map per expert, counting calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, D, D, dtype=torch.float64) * 0.3)
        self.calls = 0

    def forward(self, x):  # (E, M, D) -> (E, M, D)
        self.calls += 1
        return torch.bmm(x, self.w)


@pytest.mark.parametrize("make", [lambda: SoftMoE(D, E, P, hidden_dim=H), lambda: TokensChoiceMoE(D, E, H, k=2),
                                  lambda: ExpertsChoiceMoE(D, E, H)], ids=["soft", "tokens", "experts"])
def test_every_layer_calls_a_custom_experts_module(make, device):
    layer = make().double().to(device)
    layer.experts = CountingExperts().to(device)
    x = tokens(device).requires_grad_()
    layer(x).sum().backward()
    assert layer.experts.calls == 1
    assert layer.experts.w.grad is not None and layer.experts.w.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("act,ref_act", [(nn.ReLU, torch.relu), (lambda: nn.GELU(), gelu_exact)], ids=["relu", "gelu"])
def test_soft_moe_runs_the_experts_activation(impl, act, ref_act, device):
    """The bug this seam fixed: the fused layer ran its own tanh GELU on the raw weights of any
    experts module with an `impl` (a converted timm MLP: exact GELU off by 8e-6, ReLU by 0.23)."""
    layer = SoftMoE(D, E, P, hidden_dim=H, impl=impl).double()
    layer.experts = MlpExperts(E, D, H, act=act(), impl=impl).double()
    randomize_(layer, seed=3)
    layer = layer.to(device)
    x = tokens(device)
    assert_close64(layer(x), soft_moe_reference(layer, x, act=ref_act))


def test_exact_gelu_experts_keep_the_fused_path_and_agree_with_the_reference(device):
    fast = Experts(E, D, H, act_layer=nn.GELU).double()
    slow = Experts(E, D, H, act_layer=nn.GELU, impl="reference").double().to(device)
    randomize_(fast, seed=4)
    fast = fast.to(device)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(E, 7, D, dtype=torch.float64, generator=torch.Generator(device=device).manual_seed(2),
                    device=device)
    assert fast.fused_applies(x) and not slow.fused_applies(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), slow(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close64(ya, yb)
    assert_close64(xa.grad, xb.grad)
    for p, q in zip(fast.parameters(), slow.parameters()):
        assert_close64(p.grad, q.grad)


def test_active_dropout_takes_the_reference_path_and_drops(device, generator):
    experts = MlpExperts(E, D, H, act=nn.GELU(), drop1=nn.Dropout(0.5)).double().to(device)
    x = torch.randn(E, 7, D, dtype=torch.float64, generator=generator, device=device)
    assert not experts.fused_applies(x)  # training with p = 0.5: the dropout must run
    torch.manual_seed(0)  # the dropout draws from the device's default generator, seeded here
    y = experts(x)
    torch.manual_seed(0)
    w = (experts.w1, experts.b1, experts.w2, experts.b2)
    assert torch.equal(y, functional.expert_mlp(x, *w, experts.act, experts.drop1, experts.drop2))
    experts.eval()
    assert experts.fused_applies(x)  # eval: dropout is the identity, the fast path is exact
    assert_close64(experts(x), functional.expert_mlp(x, *w, experts.act))


def test_experts_reject_a_bad_activation():
    with pytest.raises(ValueError, match="act_layer must be an nn.Module"):
        Experts(E, D, H, act_layer=torch.relu)


@pytest.mark.cpu_only  # the buffer pools serve CPU tensors only (device allocators cache memory themselves)
def test_each_component_owns_its_pool():
    from softmoe.layers.fused.buffers import pool_of
    layer = SoftMoE(D, E, P, hidden_dim=H)
    layer(tokens(torch.device("cpu"), dtype=torch.float32).requires_grad_()).sum().backward()
    assert set(pool_of(layer.router)._storages) == {"slots", "y", "g_ys", "dx"}
    assert set(pool_of(layer.experts)._storages) == {"h", "a", "w1_grad", "w2_grad"}


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package under `root` it imports (relative imports; importing
    `a.b` also runs `a/__init__` unless the importer lives inside `a`), module names relative to
    `root` ("fused.routing", "fused.__init__")."""
    mods = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}

    def resolve(dotted, importer):
        parts = [q for q in dotted.split(".") if q]
        home = importer.split(".")[:-1]
        out = {".".join(parts[:i] + ["__init__"]) for i in range(1, len(parts)) if parts[:i] != home[:i]}
        out.add(".".join(parts) if ".".join(parts) in mods else ".".join(parts + ["__init__"]))
        return out & mods

    graph = {}
    for name in mods:
        pkg = name.split(".")[:-1]  # the package a module's relative imports start from
        deps = set()
        for node in ast.walk(ast.parse((root / (name.replace(".", "/") + ".py")).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                if node.module:
                    deps |= resolve(".".join(base + [node.module]), name)
                else:
                    for alias in node.names:
                        deps |= resolve(".".join(base + [alias.name]), name)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack + [n, d]
            if d not in state and (found := visit(d, stack + [n])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [])):
            return found
    return None


def test_layers_package_has_no_import_cycle():
    root = Path(__file__).resolve().parents[2] / "softmoe" / "layers"
    cycle = find_cycle(import_graph(root))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("from . import sub\n")
    (tmp_path / "sub" / "__init__.py").write_text("from .b import x\n")
    (tmp_path / "sub" / "b.py").write_text("from .. import a as reference\n")
    assert find_cycle(import_graph(tmp_path)) is not None
    (tmp_path / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path)) is None
