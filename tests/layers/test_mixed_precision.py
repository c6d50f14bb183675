"""The layers under bf16 / fp16 autocast (docs/design.md §1.3): the fused path runs (spied on,
not timed), routing in float32, experts in the autocast dtype, float32 parameter gradients,
and fused and reference paths both within the dtype's rounding of a float64 reference.

Tolerance (relative to the largest reference magnitude): `2 u sqrt(K)`, u the unit roundoff of
the autocast dtype (bf16 2^-8, fp16 2^-11) and K the longest reduction behind the tensor: the
expert hidden width H = 32 for the output and every gradient (D, N and S are smaller), except
the router's scalar `scale`, whose gradient sums over all B*N*S logits (`REDUCTION`). Every
output or gradient is a short chain of matmuls whose operands were rounded once to u
(float32 accumulation): independent roundings add up like a random walk, sqrt(K) per
reduction; 2 covers the chain. Measured on the CPU: at most 3.5 u for every tensor but the
scale's gradient (12 u of its own magnitude, which cancels; limit 31 u), the limit being
11.3 u, while a routing or mixing rule broken in any way is off by O(1).

Device-agnostic: `SOFTMOE_TEST_DEVICE=cuda` runs the same assertions under CUDA autocast
(tests/conftest.py); the float64 references compute on the device under test.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import softmoe.layers.fused.experts as fused_experts
import softmoe.layers.router as router_mod
from layers_reference import randomize_
from softmoe import CausalSoftMoE, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.layers.experts import Experts

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOW = list(UNIT_ROUNDOFF)
D, E, P, H, B, N = 16, 4, 2, 32, 3, 10
FUSED_NODES = {"FusedSoftRoutingBackward", "FusedCombineBackward", "ExpertsMLPBackward"}
REDUCTION = {"router.scale": B * N * E * P}  # else H


def tolerance(dtype: torch.dtype, K: int = H) -> float:
    return 2 * UNIT_ROUNDOFF[dtype] * math.sqrt(K)


def grad_fn_names(t):
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def soft_layer(device, seed=0, **kw):
    layer = SoftMoE(D, E, slots_per_expert=P, hidden_dim=H, **kw)
    randomize_(layer, std=0.3, seed=seed)
    with torch.no_grad():
        layer.router.scale.fill_(2.5)  # sharper routing than at init
    return layer.to(device)


def float64_twin(layer, cls, **kw):
    twin = cls(**kw, impl="reference").double().to(next(layer.parameters()).device)
    twin.load_state_dict(layer.state_dict())
    return twin.train(layer.training)


def run(layer, x, dy, mask=None, autocast=None):
    """Output and the gradients of x and every parameter, under `autocast` (a dtype) or not."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        y = layer(x, mask)
    y.backward(dy.to(y.dtype))
    return y, [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


RATIOS = []  # (what, error / limit) of every comparison, for measuring the margin by hand


def assert_within(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    RATIOS.append((what, err / scale / tol))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"


def masks(device):
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[0, 7:] = False
    mask[2, ::3] = False
    return [None, mask]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("logits_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_moe_under_autocast_matches_float64(dtype, logits_dtype, masked, device, generator):
    x = torch.randn(B, N, D, generator=generator, device=device)
    dy = torch.randn(B, N, D, generator=generator, device=device)
    mask = masks(device)[masked]
    kw = dict(dim=D, num_experts=E, slots_per_expert=P, hidden_dim=H)
    layer = soft_layer(device, logits_dtype=logits_dtype)
    _, want = run(float64_twin(layer, SoftMoE, **kw), x.double(), dy.double(), mask)
    names = ["y", "x"] + [n for n, _ in layer.named_parameters()]
    results = {}
    for impl in ("fused", "reference"):
        twin = layer if impl == "fused" else SoftMoE(**kw, impl=impl, logits_dtype=logits_dtype).to(device)
        twin.load_state_dict(layer.state_dict())
        y, got = run(twin, x, dy, mask, autocast=dtype)
        assert (grad_fn_names(y) >= FUSED_NODES) == (impl == "fused")
        for name, g, w in zip(names, got, want):
            assert_within(g, w, tolerance(dtype, REDUCTION.get(name, H)), f"{impl} {name}")
        results[impl] = got
    for name, f, r in zip(names, results["fused"], results["reference"]):
        assert_within(f, r, tolerance(dtype, REDUCTION.get(name, H)), f"fused vs reference {name}")


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_dtypes_under_autocast_and_master_weights_untouched(dtype, device, generator):
    layer = soft_layer(device)
    layer.record_weights = True
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(B, N, D, generator=generator, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype  # a drop-in MLP's output dtype under autocast
    for key in ("dispatch", "combine"):
        assert layer.routing_weights[key].dtype == torch.float32
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        assert torch.equal(p.detach(), before[name]), name  # the backward never writes a weight


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_input_under_autocast(dtype, device, generator):
    # x may arrive in the autocast dtype (a bf16 activation): the same fused path, float32 routing
    layer = soft_layer(device)
    x = torch.randn(B, N, D, generator=generator, device=device).to(dtype).requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype and grad_fn_names(y) >= FUSED_NODES
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    with torch.no_grad():
        want = float64_twin(layer, SoftMoE, dim=D, num_experts=E, slots_per_expert=P, hidden_dim=H)(x.double())
    assert_within(y.detach(), want, tolerance(dtype), "y")


class _Spy:
    """Counts calls of an autograd Function's `apply` / a function, then delegates."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def apply(self, *args):
        self.calls += 1
        return self.target.apply(*args)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_fused_path_is_taken_under_autocast_in_inference(dtype, device, generator, monkeypatch):
    routing, combine = _Spy(router_mod.FusedSoftRouting), _Spy(router_mod.FusedCombine)
    inference = _Spy(fused_experts.inference)
    monkeypatch.setattr(router_mod, "FusedSoftRouting", routing)
    monkeypatch.setattr(router_mod, "FusedCombine", combine)
    monkeypatch.setattr(fused_experts, "inference", inference)
    layer = soft_layer(device).eval()
    x = torch.randn(B, N, D, generator=generator, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    assert (routing.calls, combine.calls, inference.calls) == (1, 1, 1)
    assert y.dtype == dtype
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        SoftMoE(D, E, hidden_dim=H, impl="reference").to(device)(x)
    assert (routing.calls, combine.calls, inference.calls) == (1, 1, 1)  # the reference never calls them


def test_float32_logits_route_bit_for_bit_as_without_autocast(device, generator):
    # logits_dtype="float32": routing under autocast is the float32 routing, bit for bit;
    # "autocast": float32 weights, but from a low-precision logits matmul (close, not equal).
    x = torch.randn(B, N, D, generator=generator, device=device)
    for logits_dtype, equal in (("float32", True), ("autocast", False)):
        layer = soft_layer(device, logits_dtype=logits_dtype)
        layer.record_weights = True
        layer(x)
        ref = dict(layer.routing_weights)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            layer(x)
        for key in ("dispatch", "combine"):
            got = layer.routing_weights[key]
            assert got.dtype == torch.float32
            assert torch.equal(got, ref[key]) == equal, (logits_dtype, key)
            # a logits error of ~u |logit| moves each weight by that much relative
            assert_within(got, ref[key], tolerance(torch.bfloat16), key)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls,kwargs", [(TokensChoiceMoE, dict(k=2, capacity_factor=1.0, group_size=3)),
                                        (ExpertsChoiceMoE, dict(capacity_factor=2.0))])
def test_sparse_layers_experts_fused_under_autocast(dtype, cls, kwargs, device, generator):
    kw = dict(dim=D, num_experts=E, hidden_dim=H, **kwargs)
    layer = cls(**kw)
    randomize_(layer, std=0.3)
    layer = layer.to(device).eval()  # no noise: the same routing in every run
    x = torch.randn(B, N, D, generator=generator, device=device)
    dy = torch.randn(B, N, D, generator=generator, device=device)
    _, want = run(float64_twin(layer, cls, **kw), x.double(), dy.double())
    y, got = run(layer, x, dy, autocast=dtype)
    assert "ExpertsMLPBackward" in grad_fn_names(y)  # (each layer's own combine sets y's dtype)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_within(g, w, tolerance(dtype), f"tensor {i}")


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_experts_fused_under_autocast_equal_reference(dtype, device, generator):
    ex = Experts(E, D, H, expert_init="distinct")
    randomize_(ex, std=0.3)
    ex = ex.to(device)
    ref = Experts(E, D, H, expert_init="distinct", impl="reference").to(device)
    ref.load_state_dict(ex.state_dict())
    x = 2 * torch.randn(E, 5, D, generator=generator, device=device)
    dy = torch.randn(E, 5, D, generator=generator, device=device)
    out = []
    for module in (ex, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype):
            y = module(xi)
        assert y.dtype == dtype
        y.backward(dy.to(dtype))
        out.append([y.detach(), xi.grad] + [p.grad for p in module.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in module.parameters())
    assert ex.fused_applies(x) and not ref.fused_applies(x)
    for f, r in zip(*out):
        assert_within(f, r, tolerance(dtype), "experts")


def test_logits_dtype_is_validated_and_shown():
    with pytest.raises(ValueError, match=r"logits_dtype must be one of \['autocast', 'float32'\], got 'bf16'"):
        SoftMoE(6, 3, logits_dtype="bf16")
    assert "logits_dtype='autocast'" in repr(SoftMoE(6, 3, logits_dtype="autocast"))
    assert "logits_dtype" not in repr(SoftMoE(6, 3))  # the default is not printed


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_mixing_matmuls_run_in_float32_under_autocast(impl, device, generator):
    # docs/design.md §1.3: the slots and the output are the float32 mixing, rounded once to
    # the autocast dtype (bit for bit), not a mixing of rounded routing weights.
    router = soft_layer(device, impl=impl).router
    x = torch.randn(B, N, D, generator=generator, device=device)
    ys = torch.randn(E, P * B, D, generator=generator, device=device)
    slots32, routing32 = router.dispatch(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        slots, routing = router.dispatch(x)
        y = router.combine(ys.bfloat16(), routing)
    assert routing.fused == routing32.fused == (impl == "fused")
    assert slots.dtype == y.dtype == torch.bfloat16
    assert torch.equal(slots, slots32.bfloat16())
    y_from_rounded_ys = router.combine(ys.bfloat16().float(), routing32)  # the experts' bf16 output, mixed in fp32
    assert torch.equal(y, y_from_rounded_ys.bfloat16())


# -- CausalSoftMoE (docs/design.md §8): the same precision rule as SoftMoE's -------------------
# T = 13 with C = 8 (the default C = S = E*P): two chunks, the second partial. Its longest
# reductions are still H = 32 (D = 16, C = 8, 2S = 16, B*T = 26 tokens into phi's gradient),
# except the scale's gradient, which sums over every dispatch and combine logit. Measured on
# the CPU: at most 2 u for every tensor (limit 11.3 u; the scale's 1.6 u, limit 68 u).
T_CAUSAL = 13
CAUSAL_REDUCTION = {"router.scale": B * 16 * 3 * E * P}  # B * K*C * (S + 2S) logits


def causal_layer(device, seed=0, **kw):
    layer = CausalSoftMoE(D, E, slots_per_expert=P, hidden_dim=H, **kw)
    randomize_(layer, std=0.3, seed=seed)
    with torch.no_grad():
        layer.router.scale.fill_(2.5)  # sharper routing than at init
    return layer.to(device)


CAUSAL_KW = dict(dim=D, num_experts=E, slots_per_expert=P, hidden_dim=H)


def causal_mask(device):
    mask = torch.ones(B, T_CAUSAL, dtype=torch.bool, device=device)
    mask[0, 10:] = False
    mask[2, 1::3] = False  # the first token stays real: every real token has a usable slot
    return mask


class _MatmulLog(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes) of every matmul and softmax that runs,
    below autocast (so with the dtypes autocast chose)."""
    OPS = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "dot", "mv", "_softmax"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((name, tuple(t.dtype for t in ts), tuple(tuple(t.shape) for t in ts)))
        return func(*args, **(kwargs or {}))

    def low_precision_matmuls(self):
        return [op for op in self.ops if op[0] != "_softmax" and any(d in LOW for d in op[1])]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("logits_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("masked", [False, True])
def test_causal_under_autocast_matches_float64(dtype, logits_dtype, masked, device, generator):
    x = torch.randn(B, T_CAUSAL, D, generator=generator, device=device)
    dy = torch.randn(B, T_CAUSAL, D, generator=generator, device=device)
    mask = causal_mask(device) if masked else None
    layer = causal_layer(device, logits_dtype=logits_dtype)
    _, want = run(float64_twin(layer, CausalSoftMoE, **CAUSAL_KW), x.double(), dy.double(), mask)
    names = ["y", "x"] + [n for n, _ in layer.named_parameters()]
    results = {}
    for impl in ("fused", "reference"):
        twin = layer if impl == "fused" else CausalSoftMoE(**CAUSAL_KW, impl=impl, logits_dtype=logits_dtype).to(device)
        twin.load_state_dict(layer.state_dict())
        y, got = run(twin, x, dy, mask, autocast=dtype)
        assert y.dtype == dtype  # a drop-in MLP's output dtype under autocast
        assert all(p.grad.dtype == torch.float32 for p in twin.parameters())
        for name, g, w in zip(names, got, want):
            assert_within(g, w, tolerance(dtype, CAUSAL_REDUCTION.get(name, H)), f"causal {impl} {name}")
        results[impl] = got
    for name, f, r in zip(names, results["fused"], results["reference"]):
        assert_within(f, r, tolerance(dtype, CAUSAL_REDUCTION.get(name, H)), f"causal fused vs reference {name}")


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("logits_dtype", ["float32", "autocast"])
def test_causal_routing_runs_in_float32_under_autocast(impl, logits_dtype, device, generator):
    # Every softmax input is float32, and the only low-precision matmuls are the experts' own
    # (plus the logits matmul with logits_dtype="autocast"): the mixing matmuls are float32.
    layer = causal_layer(device, impl=impl, logits_dtype=logits_dtype)
    layer.record_weights = True
    x = torch.randn(B, T_CAUSAL, D, generator=generator, device=device, requires_grad=True)
    seen = []
    layer.experts.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out.dtype)))
    with torch.autocast(device.type, dtype=torch.bfloat16), _MatmulLog() as log:
        y = layer(x)
    with torch.autocast(device.type, dtype=torch.bfloat16), _MatmulLog() as experts_log:
        layer.experts(seen[0][0])
    assert y.dtype == torch.bfloat16
    assert seen[0][0].dtype == seen[0][1] == torch.bfloat16  # the experts run in the autocast dtype
    softmaxes = [op for op in log.ops if op[0] == "_softmax"]
    assert len(softmaxes) == 2 and all(op[1] == (torch.float32,) for op in softmaxes)  # dispatch, combine
    logits_matmul = log.ops[0]  # the router's x @ phi, before anything else
    assert logits_matmul[1] == ((torch.bfloat16,) * 2 if logits_dtype == "autocast" else (torch.float32,) * 2)
    expected = ([logits_matmul] if logits_dtype == "autocast" else []) + experts_log.low_precision_matmuls()
    assert experts_log.low_precision_matmuls() and log.low_precision_matmuls() == expected
    for key in ("dispatch", "combine"):
        assert layer.routing_weights[key].dtype == torch.float32


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_causal_mixing_matmuls_run_in_float32_under_autocast(impl, device, generator):
    # The slots are the float32 dispatch rounded once to bf16, and the output the float32
    # combine of the (bf16) expert outputs rounded once: bit for bit, as SoftMoE's.
    layer = causal_layer(device, impl=impl)
    x = torch.randn(B, T_CAUSAL, D, generator=generator, device=device)
    ys = torch.randn(E, P * B * 2, D, generator=generator, device=device)  # K = 2 chunks
    slots, out_ys = [], []

    def hook(mod, args, out):
        slots.append(args[0])
        return out_ys[0]

    layer.experts.register_forward_hook(hook)
    out_ys.append(ys.bfloat16().float())  # the experts' bf16 output, as float32 values
    y32 = layer(x)
    out_ys[0] = ys.bfloat16()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert slots[1].dtype == y.dtype == torch.bfloat16
    assert torch.equal(slots[1], slots[0].bfloat16())
    assert torch.equal(y, y32.bfloat16())


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_causal_exactly_causal_under_autocast(dtype, device, generator):
    # docs/design.md §8.2 under autocast: the gradient of y_t wrt every future token is exactly
    # zero (not small), while y_t does depend on its past.
    layer = causal_layer(device)
    x = torch.randn(2, T_CAUSAL, D, generator=generator, device=device, requires_grad=True)
    r = torch.randn(2, T_CAUSAL, D, generator=generator, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    for t in range(T_CAUSAL):
        (g,) = torch.autograd.grad((y[:, t].float() * r[:, t]).sum(), x, retain_graph=True)
        assert (g[:, t + 1:] == 0).all(), f"y_{t} depends on the future"
        assert g[:, :t + 1].abs().sum() > 0


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True])
def test_causal_decoding_equals_parallel_forward_under_autocast(dtype, masked, device, generator):
    # Both paths route in float32 and round each slot once to `dtype` before its expert; they
    # differ only by the float32 rounding of the online vs the chunked softmax (~1e-7), which
    # may flip a slot entry's rounding by one ulp of `dtype`: the error stays within one
    # rounding of the expert MLP, the `2 u sqrt(H)` limit of the float64 comparisons above.
    layer = causal_layer(device).eval()
    x = torch.randn(B, T_CAUSAL, D, generator=generator, device=device)
    mask = causal_mask(device) if masked else None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        y = layer(x, mask)
        state, steps = layer.init_state(B), []
        for t in range(T_CAUSAL):
            y_t, state = layer.step(x[:, t], state, None if mask is None else mask[:, t])
            steps.append(y_t)
    assert y.dtype == steps[0].dtype == dtype
    assert state.m.dtype == state.acc.dtype == torch.float32  # the online softmax runs in float32
    assert_within(torch.stack(steps, 1), y, tolerance(dtype), "decoding vs forward")
