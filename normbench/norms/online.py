"""Online Normalization (Chiley et al., NeurIPS 2019): BN's per-channel normalization with streaming
statistics instead of batch statistics, and a backward of its own.

Where it stands: in BN's conv positions, (N, C, H, W) feature maps, one layer per norm slot (a ReLU after
it where BN+ReLU stood). Samples are a stream, processed in order (sample 0 of a batch first, the next
batch after the last sample of this one), as in the authors' kernels: each sample is normalized with the
statistics of the samples *before* it, which then take it in.

Forward, per sample t and channel, mu(x_t) and sigma^2(x_t) its mean and (biased) variance over (H, W)::

    y_t = (x_t - mu_{t-1}) / sqrt(sigma^2_{t-1} + eps)
    mu_t = a_f mu_{t-1} + (1 - a_f) mu(x_t)
    sigma^2_t = a_f sigma^2_{t-1} + (1 - a_f) sigma^2(x_t) + a_f (1 - a_f) (mu(x_t) - mu_{t-1})^2

then z_t = gamma y_t + beta (per channel, ``affine``) and the error compensation (``ecm``): layer scaling
(``ls``, the CIFAR experiments' choice) o_t = z_t / sqrt(<z_t^2>_CHW + ls_eps), activation clamping
(``ac``) o_t = clip(z_t, -clamp_value, clamp_value), or none.

Backward: not the gradient of that forward (whose statistics depend on every earlier sample) but the
paper's control processes, which make the gradient orthogonal to y and to 1 in the exponential average,
with error accumulators eps^(y), eps^(1) carried from sample to sample (<.> the mean over (H, W))::

    x~'_t = y'_t - (1 - a_b) eps^(y)_{t-1} y_t;   eps^(y)_t = eps^(y)_{t-1} + <x~'_t y_t>
    x'_t = x~'_t / sqrt(sigma^2_{t-1} + eps) - (1 - a_b) eps^(1)_{t-1};   eps^(1)_t = eps^(1)_{t-1} + <x'_t>

y'_t the gradient reaching y_t through the affine and the error compensation, which get their true
gradients (autograd's, written out here), as do gamma and beta.

Evaluation: the same transform with the streaming statistics frozen (mu, sigma^2 as training left them,
for every sample), the affine and the error compensation; nothing moves.

Vectorized over the batch, no loop over samples: each recurrence is linear in its state with per-sample
coefficients, computed on (N, C) per-map statistics in float64: the constant-coefficient ones (mu, sigma^2,
eps^(1)) as one matrix product (``_decay_matrix``), eps^(y), whose decay 1 - (1 - a_b) <y_t^2> varies, by a
log2(N)-step scan (``_scan``); the reference's per-sample loop to float64 rounding. The feature maps are read
twice per pass: eagerly by torch's batch-norm kernels with the samples folded into the channels (per-map
moments, the backward's sums), then one elementwise pass (the output, the input gradient), in x's layout.
On a CPU the forward and the backward are each one compiled function (``cpu_fused(float32=True)``, in float32
as under bf16 autocast): every statistic and every map in float32 at least, the output and the input gradient
rounded once to the input's dtype; the buffers stay float32.

Batch-independent in the registry's sense: a sample's output depends on the stream of samples before it,
not on how the stream is cut into batches (a batch of 6 gives what three batches of 2 give in turn), and the
layer uses no batch statistics. So none of the batch-statistics features applies: ``virtual_batch`` has no
effect (as for every batch-independent norm); PreciseBN, batch-statistics evaluation and the FrozenBN tail
act on BatchStatNorm layers only, so evaluation uses the streaming statistics (eval_stats=ema) and they
keep streaming in a FrozenBN tail; there is no ``sync`` (each rank of a data-parallel run normalizes the
stream of its own slices, its buffers its own, like BN without sync).

State (buffers, float32, so a state_dict resumes exactly): ``stream_mean``, ``stream_var`` (mu, sigma^2;
start 0, 1), ``error_y``, ``error_1`` (eps^(y), eps^(1), the reference's v and u; start 0). The error
accumulators move in the backward, once per backward of a training forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from normbench.norms.fused import cpu_fused
from normbench.norms.layers import NormConfigError, float32_at_least, init_affine


def _scan(h0: torch.Tensor, coef: torch.Tensor, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear recurrence h_t = coef_t h_{t-1} + add_t over dim 0 (t = 0 .. n-1) from h_{-1} = ``h0``:
    returns (h_{t-1} for every t, the state each sample sees, and h_{n-1}). A Hillis-Steele scan over the
    composed affine maps x -> a x + b: log2(n) vectorized steps, the sequential loop's values up to the order
    of roundings (no division: any coefficient, zero or negative)."""
    a, b, step = coef, add, 1
    while step < add.shape[0]:
        b = torch.cat([b[:step], torch.addcmul(b[step:], a[step:], b[:-step])])
        a = torch.cat([a[:step], a[step:] * a[:-step]])
        step *= 2
    h = torch.addcmul(b, a, h0)
    return torch.cat([h0.unsqueeze(0), h[:-1]]), h[-1]


def _decay_matrix(n: int, alpha: float, weight: float, like: torch.Tensor) -> torch.Tensor:
    """The (n+1, n+1) matrix M with [h_{-1}, h_0, .., h_{n-1}] = M @ [h_{-1}, u_0, .., u_{n-1}] for the
    constant-coefficient recurrence h_t = alpha h_{t-1} + weight u_t: M[r, 0] = alpha^r, M[r, j] = weight
    alpha^(r-j) for 1 <= j <= r (an exponential moving average as one matrix product)."""
    steps = torch.arange(n + 1, dtype=like.dtype, device=like.device)
    matrix = torch.pow(alpha, (steps.unsqueeze(1) - steps).clamp_min(0)).tril_()
    matrix[:, 1:] *= weight
    return matrix


def _ema(h0: torch.Tensor, inputs: torch.Tensor, alpha: float, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = alpha h_{t-1} + weight u_t over ``inputs`` (n, C) from h0 (C,): (h_{t-1} for every t, h_{n-1}).
    One product with ``_decay_matrix`` up to 256 samples; beyond, where its (n+1)^2 entries would outgrow the
    data, the scan."""
    if inputs.shape[0] > 256:
        return _scan(h0.to(inputs.dtype), torch.full_like(inputs, alpha), weight * inputs)
    h = _decay_matrix(inputs.shape[0], alpha, weight, inputs) @ torch.cat([h0.unsqueeze(0).to(inputs.dtype), inputs])
    return h[:-1], h[-1]


def _folded(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (1, N*C, H*W): every (sample, channel) map a channel of torch's batch-norm kernels."""
    return t.reshape(1, t.shape[0] * t.shape[1], -1)


def _map_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (H, W) of every (sample, channel) map, (N, C), in float32 at least.
    Eagerly the batch-norm kernel's statistics of the folded maps (on a CPU 15x faster than var_mean; a
    low-precision input read as it is, in float32 arithmetic, which a float32 buffer selects); in a compiled
    graph the plain reduction, which Inductor fuses."""
    if torch.compiler.is_compiling():
        var, mean = torch.var_mean(float32_at_least(x), dim=(2, 3), unbiased=False)
        return mean, var
    folded = _folded(x)
    scratch = torch.zeros(folded.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    mean, var = torch.batch_norm_update_stats(folded, scratch, None, 0.0)
    return mean.view(x.shape[:2]), var.view(x.shape[:2])


def _map_sums(grad: torch.Tensor, x: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(grad) and sum(grad * (x - center)) over (H, W) of every (sample, channel) map, (N, C), in float32 at
    least: eagerly the reductions of torch's batch-norm backward (one fused pass), compiled the plain sums."""
    if torch.compiler.is_compiling():
        g32 = float32_at_least(grad)
        return g32.sum((2, 3)), (g32 * (float32_at_least(x) - _as_map(center, g32.dtype))).sum((2, 3))
    _, centered, total = torch.ops.aten.native_batch_norm_backward(
        _folded(grad), _folded(x), None, None, None, center.flatten(), torch.ones_like(center.flatten()), True, 0.0,
        [False, True, True])
    return total.view(x.shape[:2]), centered.view(x.shape[:2])


def _as_map(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1) in ``dtype``."""
    return t.to(dtype).view(*t.shape, 1, 1)


@cpu_fused(float32=True)
def _forward_pass(x: torch.Tensor, stream_mean: torch.Tensor, stream_var: torch.Tensor, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, alpha_fwd: float, eps: float, ls_eps: float | None):
    """The training forward of ``x`` from the streaming statistics (mean, var) (C,): returns the output (in x's
    dtype), the statistics after the batch, and the (N, C) statistics the backward needs. Per-map statistics in
    float64; on a CPU for a low-precision x fused into two passes over x."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, c = x.shape[:2]
    mu, var = (t.double() for t in _map_moments(x))
    mean_prev, mean_last = _ema(stream_mean, mu, alpha_fwd, 1 - alpha_fwd)
    delta = mu - mean_prev
    # (1 - a) var + a (1 - a) delta^2 = (1 - a) (var + a delta^2)
    var_prev, var_last = _ema(stream_var, torch.addcmul(var, delta, delta, value=alpha_fwd), alpha_fwd, 1 - alpha_fwd)
    rstd = var_prev.add(eps).rsqrt()
    y_mean = delta * rstd  # <y_t> per map
    y_sq = torch.addcmul(y_mean.square(), var, rstd.square())  # <y_t^2> per map
    gamma = weight.double() if weight is not None else torch.ones(c, dtype=torch.double, device=x.device)
    beta = bias.double() if bias is not None else torch.zeros(c, dtype=torch.double, device=x.device)
    gamma_rstd = gamma * rstd
    if ls_eps is None:
        scale = torch.ones_like(y_mean[:, :1])
    else:  # layer scaling: 1 / sqrt(<z^2> over (C, H, W) + ls_eps) per sample, <z^2> = (gamma rstd)^2 var + <z>^2
        z_mean = torch.addcmul(beta, gamma, y_mean)
        scale = torch.addcmul(z_mean.square(), gamma_rstd.square(), var).mean(1, keepdim=True).add_(ls_eps).rsqrt_()
    # out = scale (gamma y + beta) = x * scale gamma rstd + scale (beta - gamma rstd mean_prev): one pass in x's
    # layout (channels-last kept for the next conv), a fresh tensor (a view could not be modified in place).
    slope = gamma_rstd * scale
    out = torch.addcmul(_as_map(torch.addcmul(beta, gamma_rstd, mean_prev, value=-1.0) * scale, dtype),
                        float32_at_least(x), _as_map(slope, dtype)).to(x.dtype)
    return out, mean_last, var_last, (mu, mean_prev, rstd, y_mean, y_sq, scale, slope, gamma, beta)


@cpu_fused(float32=True)
def _backward_pass(grad: torch.Tensor, x: torch.Tensor, stats: tuple, error_y: torch.Tensor, error_1: torch.Tensor,
                   alpha_bkw: float, layer_scaling: bool):
    """The control processes' backward of ``_forward_pass`` for the output gradient ``grad`` from the accumulators
    (eps^(y), eps^(1)) (C,): returns the input gradient (x's dtype), the gradients of gamma and beta (float64,
    (C,)) and the accumulators after the batch. On a CPU for a low-precision x fused into two passes."""
    mu, mean_prev, rstd, y_mean, y_sq, scale, slope, gamma, beta = stats
    dtype = torch.promote_types(x.dtype, torch.float32)
    leak = 1 - alpha_bkw
    count = x[0, 0].numel()
    total, centered = (t.double() / count for t in _map_sums(grad, x, mu.to(dtype)))  # <o'>, <o' (x - mu)>
    grad_y = torch.addcmul(y_mean * total, rstd, centered)  # <o' y> per map (o' = grad)
    if layer_scaling:
        # o = s z, s = (<z^2>_CHW + ls_eps)^-1/2: z' = s (o' - o <o' o>_CHW) = s o' - s^2 p z, p = <o' o>_CHW.
        p_scale = (torch.addcmul(beta * total, gamma, grad_y) * scale).mean(1, keepdim=True) * scale.square()
        z_grad_mean = scale * total - p_scale * torch.addcmul(beta, gamma, y_mean)  # <z'>
        z_grad_y = scale * grad_y - p_scale * torch.addcmul(beta * y_mean, gamma, y_sq)  # <z' y>
    else:
        p_scale = torch.zeros_like(scale)
        z_grad_mean, z_grad_y = total, grad_y
    # The control processes, y' = gamma z': eps^(y) takes <y' y> and decays by 1 - leak <y^2> (from
    # x~' = y' - leak eps^(y) y), then eps^(1) takes <x~'> / sigma and decays by alpha_bkw.
    error_y_prev, error_y_last = _scan(error_y.double(), 1 - leak * y_sq, gamma * z_grad_y)
    x_grad_mean = rstd * (gamma * z_grad_mean - leak * error_y_prev * y_mean)
    error_1_prev, error_1_last = _ema(error_1, x_grad_mean, alpha_bkw, 1.0)
    # x' = rstd y' - leak eps^(y) rstd y - leak eps^(1), y' = gamma s o' - gamma s^2 p (gamma y + beta): affine in o'
    # and x (y = (x - mean_prev) rstd) with per-map coefficients (slope = gamma rstd s), two passes eagerly.
    gamma_rstd = gamma * rstd
    k_x = -(gamma_rstd.square() * p_scale + leak * error_y_prev * rstd.square())
    k_0 = -(gamma_rstd * p_scale * beta + leak * error_1_prev) - k_x * mean_prev
    grad_x = torch.addcmul(_as_map(k_0, dtype), float32_at_least(x), _as_map(k_x, dtype))
    grad_x = grad_x.addcmul_(float32_at_least(grad), _as_map(slope, dtype)).to(x.dtype)
    return grad_x, count * z_grad_y.sum(0), count * z_grad_mean.sum(0), error_y_last, error_1_last


class _OnlineNormalization(torch.autograd.Function):
    """Training forward (streaming statistics, affine, layer scaling if ``ls_eps`` is given) and the control
    processes' backward. ``state`` = (stream_mean, stream_var, error_y, error_1), moved in place. Autocast is
    off in both (the float64 matrix products must stay float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, alpha_fwd: float, alpha_bkw: float, eps: float, ls_eps: float | None):
        with torch.autocast(x.device.type, enabled=False):
            out, mean_last, var_last, ctx.stats = _forward_pass(x, state[0], state[1], weight, bias, alpha_fwd, eps,
                                                                ls_eps)
        state[0].copy_(mean_last)
        state[1].copy_(var_last)
        ctx.save_for_backward(x)
        ctx.state, ctx.alpha_bkw, ctx.layer_scaling = state, alpha_bkw, ls_eps is not None
        ctx.param_dtype = None if weight is None else weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad_x, grad_w, grad_b, error_y, error_1 = _backward_pass(
                grad_out, x, ctx.stats, ctx.state[2], ctx.state[3], ctx.alpha_bkw, ctx.layer_scaling)
        ctx.state[2].copy_(error_y)
        ctx.state[3].copy_(error_1)
        if ctx.param_dtype is None:
            return grad_x, None, None, None, None, None, None, None
        return grad_x, grad_w.to(ctx.param_dtype), grad_b.to(ctx.param_dtype), None, None, None, None, None


class OnlineNorm(nn.Module):
    """Online Normalization (Chiley et al. 2019) in BN's place; the definition, the model-wide features'
    mapping and the state are the module docstring's.

    Options (defaults: the authors' CIFAR-10 ResNet-20 runs, experiments/resnet): ``alpha_fwd`` (a_f,
    1023/1024; the library's default 0.999 is ImageNet's) and ``alpha_bkw`` (a_b, 127/128; 0.99), ``eps``
    inside the square root, ``affine`` (per-channel gamma, beta), ``ecm`` the error compensation ("ls"
    layer scaling over (C, H, W) per sample, the CIFAR runs' default; "ac" clamping, the library's later
    default; "none"), ``ls_eps`` layer scaling's eps and ``clamp_value`` the clamping bound.
    """

    def __init__(self, num_features: int, *, alpha_fwd: float = 1023 / 1024, alpha_bkw: float = 127 / 128,
                 eps: float = 1e-5, affine: bool = True, ecm: str = "ls", ls_eps: float = 1e-5,
                 clamp_value: float = 5.0, norm_name: str = "online"):
        super().__init__()
        self.num_features = num_features
        self.alpha_fwd, self.alpha_bkw, self.eps = float(alpha_fwd), float(alpha_bkw), float(eps)
        self.ecm, self.ls_eps, self.clamp_value = ecm, float(ls_eps), float(clamp_value)
        self.norm_name = norm_name
        init_affine(self, num_features, affine)
        self.register_buffer("stream_mean", torch.zeros(num_features))
        self.register_buffer("stream_var", torch.ones(num_features))
        self.register_buffer("error_y", torch.zeros(num_features))  # eps^(y): the reference's v
        self.register_buffer("error_1", torch.zeros(num_features))  # eps^(1): the reference's u

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
                f"affine={self.weight is not None}, ecm={self.ecm}, ls_eps={self.ls_eps}, "
                f"clamp_value={self.clamp_value}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise NormConfigError(f"norm '{self.norm_name}' normalizes (N, C, H, W) feature maps (a conv's), "
                                  f"got shape {tuple(x.shape)}")
        ls_eps = self.ls_eps if self.ecm == "ls" else None
        if self.training:
            state = (self.stream_mean, self.stream_var, self.error_y, self.error_1)
            out = _OnlineNormalization.apply(x, self.weight, self.bias, state, self.alpha_fwd, self.alpha_bkw,
                                             self.eps, ls_eps)
        else:
            out = self._eval_forward(x, ls_eps)
        return out.clamp(-self.clamp_value, self.clamp_value) if self.ecm == "ac" else out

    def _eval_forward(self, x: torch.Tensor, ls_eps: float | None) -> torch.Tensor:
        """The training transform with the streaming statistics frozen, through autograd (its true gradient)."""
        with torch.autocast(x.device.type, enabled=False):
            z = F.batch_norm(float32_at_least(x), self.stream_mean, self.stream_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            if ls_eps is not None:
                z = z * z.square().mean(dim=(1, 2, 3), keepdim=True).add(ls_eps).rsqrt()
            return z.to(x.dtype)
