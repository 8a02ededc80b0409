"""Numerics of every norm under CPU bf16 autocast (issue 26, item 3).

A convolution under autocast hands its norm a bf16 feature map; every layer must compute its
statistics and its normalization in float32 and return bf16, as the same layer computes in float32
on the same values up to the rounding of its output, with its running statistics float32. The
layers are enumerated from the registry (``NORMS``), so a new norm is covered without an edit here.

The offset input (a large mean, a small spread) is the one that tells float32 statistics from bf16
ones: in bf16, 64 + 0.5 * randn is resolved to 0.25, so a bf16 mean is off by up to half a standard
deviation and a bf16 E[x^2] - E[x]^2 is noise, while float32 statistics of the same bf16 values are
exact to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from normbench.norms import (
    NORMS,
    apply_weight_reparam,
    batch_stats_mode,
    build_norm,
    precise_bn_update,
    set_training_length,
)
from normbench.norms.batch_stat import BatchStatNorm

torch.set_num_threads(1)

SHAPE = (16, 32, 16, 16)  # a ResNet-20 stage-2 feature map at batch 16
RELAXED = {"relax_unit": "steps", "relax_start": 0, "r_relax": 2, "d_relax": 1, "r_max": 1.5, "d_max": 0.5}
# Every norm with its defaults, and the options that take other code paths.
VARIANTS = [(name, {}) for name in NORMS] + [
    ("bn", {"virtual_batch": 4}), ("bn", {"affine": False}), ("brn", RELAXED), ("brn", {**RELAXED, "virtual_batch": 4}),
    ("wn", {"mean_only_bn": True}), ("wn", {"mean_only_bn": True, "virtual_batch": 4}), ("gn", {"affine": False}),
    ("ln", {"affine": False}), ("in", {"affine": False}), ("frn", {"learnable_eps": True}),
    ("lrn", {"alpha": 0.5, "k": 1.0}), ("lrn", {"size": 4, "beta": 0.6, "alpha": 0.3, "k": 1.0, "affine": False}),
]
INPUTS = {"centered": (0.0, 2.0), "offset": (64.0, 0.5)}  # mean, standard deviation


def _bf16_input(kind: str, seed: int, memory_format=torch.contiguous_format) -> torch.Tensor:
    mean, std = INPUTS[kind]
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(SHAPE, generator=g)).contiguous(memory_format=memory_format).bfloat16()


def _layers(name: str, opts: dict, apply_act: bool):
    """The norm slot in float32 and its copy for bf16, with parameters and buffers off their initial values."""
    torch.manual_seed(0)
    layer = set_training_length(build_norm(name, SHAPE[1], apply_act=apply_act, **opts), 10)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for m in layer.modules():
            if isinstance(m, BatchStatNorm):
                m.running_mean.normal_(std=0.5)
                if m.running_var is not None:
                    m.running_var.uniform_(0.5, 2.0)
    return layer, copy.deepcopy(layer)


def _assert_close_to_float32(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """bf16 tolerance: each value within 1% of itself plus 0.1% of the largest (rounding to bf16 moves a
    value by up to 0.4% of itself)."""
    assert out.dtype == torch.bfloat16, (what, out.dtype)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item(), msg=what)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _float32_buffers(layer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.named_buffers() if v.is_floating_point()}


def _forward_backward_pair(layer16, layer32, kind: str, step: int):
    """One forward and backward of `layer16` on a bf16 input under autocast and of `layer32` on the same
    values in float32, their outputs checked close; returns the two inputs, holding their gradients."""
    x = _bf16_input(kind, step)
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + step))
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer16(x16)
    out32 = layer32(x32)
    _assert_close_to_float32(out16, out32.detach(), f"output, step {step}")
    out16.float().backward(upstream)
    out32.backward(upstream.bfloat16().float())  # the gradient the bf16 output receives
    return x16, x32


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("apply_act", [True, False])
@pytest.mark.parametrize("name, opts", VARIANTS,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in VARIANTS])
def test_a_norm_under_bf16_autocast_computes_what_it_computes_in_float32(name, opts, apply_act, kind):
    """Four SGD steps, then an evaluation forward, of the layer on bf16 maps under autocast against the same
    layer in float32 on the same values: bf16 outputs within bf16 tolerance; input gradients (bf16) finite
    and within 0.5% norm-wise of the float32 layer's for the same (bf16) output gradient (its rounding is
    0.17%), parameter gradients float32 and within 0.1%; running statistics float32 and equal to float32
    rounding."""
    layer32, layer16 = _layers(name, opts, apply_act)
    opt32, opt16 = (torch.optim.SGD(m.parameters(), lr=0.1) if list(m.parameters()) else None
                    for m in (layer32, layer16))
    for step in range(4):
        x16, x32 = _forward_backward_pair(layer16, layer32, kind, step)
        assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad).all()
        assert _relative_error(x16.grad, x32.grad) < 5e-3, step
        for (pname, p16), p32 in zip(layer16.named_parameters(), layer32.parameters()):
            assert p16.dtype == torch.float32 and torch.isfinite(p16.grad).all(), pname
            # an exactly-zero float32 gradient (FRN's tau on the offset input) may be a float32 rounding in bf16
            assert _relative_error(p16.grad, p32.grad) < 1e-3 or (p16.grad - p32.grad).norm() < 1e-4, (pname, step)
        for opt in (opt32, opt16):
            if opt is not None:
                opt.step()
                opt.zero_grad()
        buffers16, buffers32 = _float32_buffers(layer16), _float32_buffers(layer32)
        assert all(b.dtype == torch.float32 for b in buffers16.values()), {k: b.dtype for k, b in buffers16.items()}
        for key, b32 in buffers32.items():
            torch.testing.assert_close(buffers16[key], b32, rtol=1e-4, atol=1e-5, msg=f"{key}, step {step}")
    layer16.eval(), layer32.eval()
    x = _bf16_input(kind, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer16(x)
    with torch.no_grad():
        _assert_close_to_float32(out16, layer32(x.float()), "evaluation")


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("name, opts", [(n, o) for n, o in VARIANTS if NORMS[n].depends_on_batch(
    {**NORMS[n].options, **o})], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "default")
def test_batch_statistics_modes_under_bf16_autocast(name, opts, kind):
    """Evaluation with batch statistics and PreciseBN under autocast: as in float32 (the forward without
    an update, where BN without affine has no float32 tensor to make torch's kernel accumulate in float32)."""
    for affine_opts in ({}, {"affine": False}) if "affine" in NORMS[name].options else ({},):
        layer32, layer16 = _layers(name, {**opts, **affine_opts}, True)
        x = _bf16_input(kind, 0)
        with torch.no_grad():
            with batch_stats_mode(layer16, 4), torch.autocast("cpu", dtype=torch.bfloat16):
                out16 = layer16(x)
            with batch_stats_mode(layer32, 4):
                _assert_close_to_float32(out16, layer32(x.float()), f"batch statistics {affine_opts}")
            batches = [_bf16_input(kind, seed) for seed in (1, 2)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                precise_bn_update(layer16, batches, 2)
            precise_bn_update(layer32, [b.float() for b in batches], 2)
        for key, b32 in _float32_buffers(layer32).items():
            b16 = _float32_buffers(layer16)[key]
            assert b16.dtype == torch.float32
            torch.testing.assert_close(b16, b32, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", [n for n in NORMS if NORMS[n].memory_format == "channels_last"])
def test_channels_last_maps_under_bf16_autocast(name):
    """The layout a bf16 run trains the norms that prefer it in: the same values, and a channels-last output."""
    layer32, layer16 = _layers(name, {}, True)
    x = _bf16_input("centered", 0, torch.channels_last)
    x16 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer16(x16)
    out32 = layer32(x.float())
    _assert_close_to_float32(out16, out32.detach(), "output")
    assert out16.is_contiguous(memory_format=torch.channels_last)
    out16.float().sum().backward()
    assert torch.isfinite(x16.grad).all()


class _AutocastSeen(TorchFunctionMode):
    """Records, for every torch call that computes (not a tensor attribute's read), whether CPU autocast was
    on when it ran."""

    def __init__(self):
        super().__init__()
        self.states: list[tuple[str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name != "__get__":
            self.states.append((name, torch.is_autocast_enabled("cpu")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, opts", [(n, o) for n in NORMS if NORMS[n].reparam is not None
                                        for o in ({}, {"exp_g": True}) if not o or "exp_g" in NORMS[n].options])
def test_weight_reparametrizations_compute_in_float32_under_autocast(name, opts):
    """The reparametrized weight (and its norm, sigma, mean and variance) is computed from the float32
    parameters with autocast off, and is the float32 weight itself, bit for bit; spectral norm's power
    iteration vectors stay float32."""
    torch.manual_seed(0)
    model = apply_weight_reparam(torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.Flatten(),
                                                     torch.nn.Linear(32, 8)), name, **opts).train()
    reference = copy.deepcopy(model)
    for layer, ref in zip(model, reference):
        if not hasattr(layer, "parametrizations"):
            continue
        seen = _AutocastSeen()
        with torch.autocast("cpu", dtype=torch.bfloat16), seen:
            weight = layer.weight
        assert seen.states and not any(on for _, on in seen.states), seen.states
        assert weight.dtype == torch.float32 and torch.equal(weight, ref.weight)
        assert all(b.dtype == torch.float32 for b in layer.buffers() if b.is_floating_point())
    x = torch.randn(4, 16, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("name, opts", [("bn", {}), ("brn", RELAXED), ("evonorm_b0", {})])
def test_synchronized_statistics_under_bf16_autocast(name, opts, kind, tmp_path, monkeypatch):
    """sync=True's path (statistics through the all-reduce of every rank's count, mean and sum of squared
    deviations, and autograd) under autocast: as the unsynchronized layer in float32 on one rank's batch,
    in a one-process gloo group whose layers are told there are two ranks (so they take the path)."""
    import torch.distributed as dist

    import normbench.norms.batch_stat as batch_stat

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(batch_stat, "data_parallel_world", lambda: 2)
        synced, _ = _layers(name, {**opts, "sync": True}, True)
        layer32, _ = _layers(name, opts, True)
        stat_layer = lambda slot: next(m for m in slot.modules() if isinstance(m, BatchStatNorm))  # noqa: E731
        assert stat_layer(synced)._syncs() and not stat_layer(layer32)._syncs()
        for step in range(3):
            x16, x32 = _forward_backward_pair(synced, layer32, kind, step)
            assert _relative_error(x16.grad, x32.grad) < 5e-3
            for key, b32 in _float32_buffers(layer32).items():
                b16 = _float32_buffers(synced)[key]
                assert b16.dtype == torch.float32
                torch.testing.assert_close(b16, b32, rtol=1e-4, atol=1e-5, msg=f"{key}, step {step}")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The fused CPU kernels of the hand-written layers' bf16 path (normbench.norms.fused)
# --------------------------------------------------------------------------------------------

def test_cpu_fused_compiles_for_a_low_precision_cpu_input_only():
    """A bf16 CPU input goes through torch.compile (the function is traced), a float32 one runs eagerly."""
    from normbench.norms.fused import cpu_fused

    traced = []

    def formula(x):
        traced.append(torch.compiler.is_compiling())
        return (x.float().sin() * 2).to(x.dtype)

    fused = cpu_fused(formula)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x.bfloat16()).float(), (x.bfloat16().float().sin() * 2).bfloat16().float())
    assert traced == [True]
    fused(x)
    assert traced == [True, False]


def test_cpu_fused_falls_back_to_the_eager_formula_with_one_warning(monkeypatch):
    """Where torch.compile fails (no C++ compiler), the formula runs eagerly from then on, after one warning."""
    from normbench.norms import fused as fused_module

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(fused_module.torch, "compile", failing_compile)
    fused = fused_module.cpu_fused(lambda x: x.float().mul(3).to(x.dtype))
    x = torch.randn(2, 3, 4, 4).bfloat16()
    with pytest.warns(RuntimeWarning, match="cannot fuse .*no C\\+\\+ compiler found\\); running it eagerly"):
        out = fused(x)
    torch.testing.assert_close(out, x.float().mul(3).bfloat16())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(x), out)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name, opts, apply_act", [("frn", {}, True), ("frn", {"learnable_eps": True}, False),
                                                   ("evonorm_s0", {}, True), ("lrn", {}, True),
                                                   ("lrn", {"size": 4, "beta": 0.6, "alpha": 0.3, "k": 1.0}, True)])
def test_the_fused_bf16_path_computes_what_the_eager_one_does(name, opts, apply_act, memory_format):
    """The compiled kernels of a layer's bf16 path against the same function run eagerly on the same bf16 map:
    outputs within one bf16 rounding, input and parameter gradients within float32 rounding of each other."""
    from normbench.norms import fused as fused_module

    torch.manual_seed(0)
    fused_layer = build_norm(name, SHAPE[1], apply_act=apply_act, **opts)
    with torch.no_grad():
        for p in fused_layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    eager_layer = copy.deepcopy(fused_layer)
    x = _bf16_input("centered", 0, memory_format)
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for layer, compiling in ((fused_layer, True), (eager_layer, False)):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if compiling:
                out = layer(x_in)
            else:
                with _eager_only(fused_module):
                    out = layer(x_in)
        out.backward(upstream)
        results.append((out, x_in.grad, [p.grad for p in layer.parameters()]))
    (out_f, gx_f, gp_f), (out_e, gx_e, gp_e) = results
    assert out_f.dtype == torch.bfloat16 and out_f.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out_f.float(), out_e.float(), rtol=8e-3, atol=1e-3 * out_e.abs().max().item())
    assert _relative_error(gx_f, gx_e.float()) < 5e-3
    for a, b in zip(gp_f, gp_e):
        assert _relative_error(a, b) < 1e-3


class _eager_only:
    """Within it, every ``cpu_fused`` function runs eagerly (as under a whole-model torch.compile)."""

    def __init__(self, fused_module):
        self.module = fused_module

    def __enter__(self):
        self.saved = self.module._low_precision_on_cpu
        self.module._low_precision_on_cpu = lambda x: False

    def __exit__(self, *exc):
        self.module._low_precision_on_cpu = self.saved
