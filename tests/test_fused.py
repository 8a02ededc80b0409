"""The float32 fused path of the remedies (``cpu_fused(float32=True)``): a float32 CPU input of SwitchNorm, EvoNorm-B0
and Online Norm goes through torch.compile in a run, and computes what the eager formula computes, up to the order
of float32 roundings. The rest of the suite runs them eagerly (conftest: NORMBENCH_EAGER_FLOAT32=1)."""

from __future__ import annotations

import copy

import pytest
import torch

from normbench.norms import build_norm
from normbench.norms import fused as fused_module
from normbench.norms.batch_stat import _evonorm_b0_apply, _evonorm_b0_train
from normbench.norms.online import _backward_pass, _forward_pass
from normbench.norms.switchable import _switch_norm_apply, _switch_norm_train


def test_float32_fusion_is_declared_per_function_and_switched_off_by_the_environment(monkeypatch):
    traced = []

    def formula(x):
        traced.append(torch.compiler.is_compiling())
        return x.sin() * 2

    declared, undeclared = fused_module.cpu_fused(float32=True)(formula), fused_module.cpu_fused(formula)
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(fused_module, "FUSE_FLOAT32", True)
    torch.testing.assert_close(declared(x), x.sin() * 2)
    assert traced == [True]
    undeclared(x)
    assert traced == [True, False]
    monkeypatch.setattr(fused_module, "FUSE_FLOAT32", False)  # NORMBENCH_EAGER_FLOAT32=1
    declared(x)
    assert traced == [True, False, False]


def test_the_remedies_declare_float32_fusion_and_the_older_layers_do_not():
    """The remedies' formulas compile in float32; FRN, EvoNorm-S0 and LRN, whose committed float32 results were
    trained eagerly, stay eager."""
    from normbench.norms import layers

    for fn in (_switch_norm_train, _switch_norm_apply, _evonorm_b0_train, _evonorm_b0_apply, _forward_pass,
               _backward_pass):
        assert fn.fuses_float32, fn.__name__
    fused_in_bf16 = [getattr(layers, name) for name in dir(layers) if hasattr(getattr(layers, name), "fuses_float32")]
    assert fused_in_bf16 and not any(fn.fuses_float32 for fn in fused_in_bf16)


@pytest.mark.parametrize("name, opts, batch", [
    ("switchnorm", {"virtual_batch": 2}, 8), ("switchnorm", {"statistics": "in_ln"}, 2),
    ("evonorm_b0", {"virtual_batch": 2}, 8), ("online", {}, 2)])
def test_the_compiled_float32_path_computes_what_the_eager_one_does(monkeypatch, name, opts, batch):
    """Three training steps (outputs, input and parameter gradients, every buffer after them), then evaluation,
    compiled against eager on the same float32 maps: within float32 rounding of each other."""
    torch.manual_seed(0)
    compiled_layer = build_norm(name, 8, **opts)
    with torch.no_grad():
        for p in compiled_layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    eager_layer = copy.deepcopy(compiled_layer)
    g = torch.Generator().manual_seed(1)
    maps = [(1.5 + torch.randn(batch, 8, 6, 6, generator=g), torch.randn(batch, 8, 6, 6, generator=g))
            for _ in range(3)]
    results = {}
    for layer, compiling in ((compiled_layer, True), (eager_layer, False)):
        monkeypatch.setattr(fused_module, "FUSE_FLOAT32", compiling)
        steps = []
        for x, upstream in maps:
            x = x.clone().requires_grad_()
            out = layer(x)
            out.backward(upstream)
            steps.append([out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()])
            layer.zero_grad()
        layer.eval()
        steps.append([layer(maps[0][0]).detach()] + [b.clone() for b in layer.buffers() if b.is_floating_point()])
        results[compiling] = steps
    for compiled_step, eager_step in zip(results[True], results[False]):
        for a, b in zip(compiled_step, eager_step):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item() + 1e-7)


COMPILE_DISABLED_SCRIPT = """
import sys, torch
import normbench.norms as norms
from normbench.norms.fused import compile_disabled
assert "torch._dynamo" not in sys.modules, "importing the norms loaded torch._dynamo"
seen = []

@compile_disabled
def host_side(x):
    seen.append(torch.compiler.is_compiling())
    return x + 1

x = torch.ones(3)
host_side(x)  # before anything compiles: the function as it is
assert "torch._dynamo" not in sys.modules and seen == [False]
layer = norms.build_norm("brn", 4)  # its step count is compile_disabled
norms.set_training_length(layer, 100)
if sys.argv[1] == "prepared":
    norms.before_compile()
model = torch.compile(lambda t: host_side(layer(t)), backend="eager")
for _ in range(3):
    model(torch.randn(2, 4, 3, 3))
assert seen == [False] * 4, seen  # never traced, compiled call or not
assert layer._steps == 3 and int(layer.num_steps) == 3
print("ok")
"""


@pytest.mark.parametrize("when", ["prepared", "inside the first trace"])
def test_compile_disabled_keeps_functions_out_of_graphs_without_loading_dynamo_before(when):
    """compile_disabled: importing the norms does not load torch._dynamo (1.2 s of every command's start); once
    something compiles, the decorated host-side code still runs eagerly, whether before_compile disabled it
    first or its first call inside a trace does."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", COMPILE_DISABLED_SCRIPT, when], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
