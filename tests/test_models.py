"""Models: every model x norm learns at tiny batches; norm-activation slots, placement, zero-init residuals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.models import MODELS, build_model
from normbench.norms import NORMS, NormConfigError, data_dependent_init, set_training_length

RESNETS = [m for m in MODELS if "zero_init_residual" in MODELS[m].options]


def norm_options(norm):
    # wn's data-dependent init is not used here: on noise images after global pooling, the last
    # layer's pre-activations barely vary, so its g = 1/std would be huge (trainer runs init on real images).
    return {}


def build(model_name, norm):
    """He-initialized deep ResNets without a normalization blow up at the first forward (logits ~1e4
    at depth 56, ~1e8 at 110): zero-initialized residual branches, the standard remedy, wherever the
    norm allows them (sn and pre-activation gn_ws do not: a one-line error)."""
    if model_name in RESNETS:
        try:
            return build_model(model_name, norm, model_options={"zero_init_residual": True}, **norm_options(norm))
        except NormConfigError as e:
            assert "zero_init_residual" in str(e)
    return build_model(model_name, norm, **norm_options(norm))


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_model_and_norm_learns_at_tiny_batches(model_name, norm):
    """A few steps on one fixed batch of 2 lower its loss; batch 1 and 8 train finitely; eval works."""
    torch.manual_seed(0)
    model = build(model_name, norm)
    set_training_length(model, 100)
    if norm == "cbn" and model_name == "preact_resnet18":  # norms after residual adds: no conv to compensate through
        with pytest.raises(NormConfigError, match="compensates through the conv"):
            model.train()(torch.randn(2, 3, 32, 32))
        return
    data_dependent_init(model, torch.randn(16, 3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), (model_name, norm, losses)
    # lowered at some step: a layer that learns fast may overshoot on one batch at this lr (evonorm_b0 in
    # preact_resnet18: 2.24 -> 0.17 -> 2.24 -> 2.99, then down again)
    assert min(losses[1:]) < losses[0] - 0.005, (model_name, norm, losses)
    for batch in (1, 8):
        loss = F.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,)))
        loss.backward()
        assert torch.isfinite(loss), (model_name, norm, batch)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("model_name, depth", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56), ("resnet110", 110)])
def test_cifar_resnet_depths(model_name, depth):
    model = build_model(model_name, "bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth  # 6n+2 weighted layers on the main path


def test_norm_layer_is_called_at_every_position_with_its_activation():
    calls = []

    def recording_norm(channels, apply_act):
        calls.append(apply_act)
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if apply_act else nn.BatchNorm2d(channels)

    from normbench.models.resnet_cifar import CifarResNet

    model = CifarResNet(20, recording_norm)
    # stem + 9 blocks x (bn1 with act, bn2 without) + 2 projection shortcuts (without)
    assert calls.count(True) == 1 + 9 and calls.count(False) == 9 + 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(calls)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_frn_tlu_is_the_nonlinearity_no_relu_after_it(model_name):
    """FRN replaces BN+ReLU: with tau = -0.5 every TLU's tau gets a gradient (a ReLU after it would
    zero it), and the slots before a residual add have no TLU at all."""
    torch.manual_seed(0)
    model = build_model(model_name, "frn").train()
    taus = [m.tau for m in model.modules() if getattr(m, "tau", None) is not None]
    with torch.no_grad():
        for tau in taus:
            tau.fill_(-0.5)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    assert taus and all(tau.grad.abs().sum() > 0 for tau in taus)
    for block in model.modules():
        if hasattr(block, "residual_conv") and block.residual_norm is not None:
            assert block.residual_norm.tau is None  # before the residual add: FRN without TLU


@pytest.mark.parametrize("model_name", list(MODELS))
def test_evonorm_negative_outputs_reach_the_next_conv(model_name):
    """EvoNorm-S0's gate is its nonlinearity: its negative outputs are not cut by a ReLU, so some
    conv sees negative inputs; with BN+ReLU none does (so the test can tell)."""
    torch.manual_seed(0)

    def conv_inputs_min(norm):
        model = build_model(model_name, norm).train()
        mins = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: mins.append(float(args[0].min())))
                 for m in list(model.modules())[1:] if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32))
        for h in hooks:
            h.remove()
        return min(mins[1:])  # the first conv sees the image

    assert conv_inputs_min("evonorm_s0") < 0
    assert conv_inputs_min("bn") >= 0


def test_placement_before_and_after_in_the_cnn():
    before = build_model("cnn", "bn", model_options={"placement": "before"})
    after = build_model("cnn", "bn", model_options={"placement": "after"})
    unit_b, unit_a = before.features[0], after.features[0]
    assert isinstance(unit_a[1], nn.ReLU) and isinstance(unit_b[1][1], nn.ReLU)
    x = torch.randn(4, 3, 32, 32)
    after.train()
    h = after.features[0](x)  # conv-ReLU-BN: the output is normalized, so it has negative values
    assert (h < 0).any()
    before.train()
    assert (before.features[0](x) >= 0).all()  # conv-BN-ReLU ends in a ReLU


def test_instance_norm_after_the_relu_makes_the_cnn_blind():
    """conv-ReLU-IN as the last unit, then global average pooling: IN leaves every channel of every
    image with spatial mean exactly beta, and the pool takes exactly that mean, so the logits are the
    same for every input and the model cannot beat chance (placement_cpu's IN-after arm, 10%).
    Before the ReLU (conv-IN-ReLU) the ReLU breaks this; LN, whose mean is over all channels, does not
    have it."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for norm, placement, blind in [("in", "after", True), ("in", "before", False), ("ln", "after", False)]:
            model = build_model("cnn", norm, model_options={"placement": placement}).train()
            for p in model.parameters():  # any weights: beta nonzero too
                p.add_(0.1 * torch.randn_like(p))
            logits = model(x)
            assert torch.allclose(logits, logits[:1].expand_as(logits), atol=1e-5) == blind, (norm, placement)


@pytest.mark.parametrize("norm", ["bn", "gn", "frn", "evonorm_s0", "none"])
def test_a_conv_feeding_a_relu_has_a_bias(norm):
    """conv-ReLU-norm: the conv feeds the ReLU, so it needs its own bias (a zero input must not map
    to exactly zero); conv-norm-ReLU: a norm with a shift makes the conv bias redundant."""
    after = build_model("cnn", norm, model_options={"placement": "after"})
    before = build_model("cnn", norm, model_options={"placement": "before"})
    for unit in after.features:
        if isinstance(unit, nn.Sequential):
            assert unit[0].bias is not None, norm
    has_shift = norm != "none"
    assert (before.features[0][0].bias is None) == has_shift


def test_weight_reparametrizations_reach_every_conv_and_linear():
    from torch.nn.utils import parametrize

    for norm in ("wn", "sn"):
        model = build_model("resnet20", norm)
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all(parametrize.is_parametrized(m, "weight") for m in layers), norm
    ws = build_model("resnet20", "gn_ws")
    convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)


@pytest.mark.parametrize("model_name", RESNETS)
@pytest.mark.parametrize("norm", ["bn", "gn", "frn", "none", "wn"])
def test_zero_init_residual_starts_every_branch_at_zero(model_name, norm):
    """With zero_init_residual each residual branch outputs exactly 0 at init (so a block is its
    shortcut); the zeroed parameter is gamma where the slot has one, else the last conv (wn: g)."""
    torch.manual_seed(0)
    model = build_model(model_name, norm, model_options={"zero_init_residual": True}).train()
    plain = build_model(model_name, norm).train()
    blocks = [m for m in model.modules() if hasattr(m, "residual_conv")]
    assert blocks
    for block in blocks:
        branch_out = []
        hook = block.residual_conv.register_forward_hook(lambda m, a, out: branch_out.append(out))
        slot = block.residual_norm
        if slot is not None and getattr(slot, "weight", None) is not None:
            assert torch.equal(slot.weight, torch.zeros_like(slot.weight))  # gamma, not 1
            hook.remove()
            continue
        with torch.no_grad():
            block(torch.randn(2, block.conv1.in_channels, 8, 8))
        hook.remove()
        assert branch_out and torch.count_nonzero(branch_out[0]) == 0
    gammas = [b.residual_norm.weight for b in plain.modules()
              if hasattr(b, "residual_conv") and getattr(b.residual_norm, "weight", None) is not None]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gammas)  # off by default


def test_zero_init_residual_makes_deep_resnets_without_norm_trainable():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    exploding = build_model("resnet110", "none")
    assert not torch.isfinite(F.cross_entropy(exploding(x), y)) or exploding(x).abs().max() > 1e6
    model = build_model("resnet110", "none", model_options={"zero_init_residual": True})
    assert torch.isfinite(F.cross_entropy(model(x), y))


def test_zero_init_residual_refuses_where_impossible():
    for norm, opts in (("sn", {}), ("wn", {"exp_g": True})):
        with pytest.raises(NormConfigError, match="zero_init_residual"):
            build_model("resnet20", norm, model_options={"zero_init_residual": True}, **opts)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="resnet20"):
        build_model("vgg", "bn")
    assert set(MODELS) == {"resnet20", "resnet32", "resnet56", "resnet110", "preact_resnet18", "cnn"}


def test_model_yaml_mirrors_model_options():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    assert {p.stem for p in conf.glob("*.yaml")} == set(MODELS)
    for name, info in MODELS.items():
        cfg = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        assert cfg.pop("name") == name
        assert cfg == info.options, name
