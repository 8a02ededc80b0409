// MABN's training step (normbench/norms/mabn.py) in C++, for a float32 CPU map: the same ATen calls in the same
// order as MovingAverageBatchNorm._train_forward (update=True, not recording) and _MovingAverageBatchNorm, so the
// same values bit for bit (tests/test_mabn.py checks it), without the Python around each of its ~40 small calls
// (at batch 2 those, not the arithmetic, were most of the layer's time). mabn.py is the definition and its
// docstrings say what each step means; a change there is a change here.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// (C,) over the virtual batches from (G, C): a view for one (batch_stat.group_mean / group_sum).
Tensor group_mean(const Tensor& t) { return t.size(0) == 1 ? t.select(0, 0) : t.mean(0); }
Tensor group_sum(const Tensor& t) { return t.size(0) == 1 ? t.select(0, 0) : t.sum(0); }

// (C,) -> (1, C, 1, ...) against a map of ndim dimensions (layers.per_channel).
Tensor per_channel(const Tensor& v, int64_t ndim) {
  std::vector<int64_t> shape(ndim, 1);
  shape[1] = -1;
  return v.view(shape);
}

// _MovingAverageBatchNorm: y = x * r gamma / sqrt(chi + eps) + beta on the folded map, and the paper's backward.
struct MovingAverageBatchNormFn : public torch::autograd::Function<MovingAverageBatchNormFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& xf, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const Tensor& chi, const c10::optional<Tensor>& r,
                        const Tensor& psi_window, int64_t slot, bool use_sma, double eps) {
    const int64_t groups = chi.size(0);
    Tensor scale;
    if (r.has_value()) {
      scale = weight.has_value() ? *r * *weight : *r;
    } else {
      scale = weight.has_value() ? weight->expand_as(chi) : torch::ones_like(chi);
    }
    scale = scale.reshape(-1);
    c10::optional<Tensor> shift;
    if (bias.has_value()) shift = groups == 1 ? *bias : bias->repeat({groups});
    Tensor zeros = torch::zeros_like(scale);
    Tensor out = torch::batch_norm(xf, scale, shift, zeros, chi.view(-1), false, 0.0, eps, true);
    ctx->save_for_backward({xf, chi, r.has_value() ? *r : Tensor(), scale, zeros, psi_window});
    ctx->saved_data["slot"] = slot;
    ctx->saved_data["use_sma"] = use_sma;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["affine"] = weight.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &xf = saved[0], &chi = saved[1], &r = saved[2], &psi_window = saved[5];
    Tensor scale = saved[3];
    const Tensor& zeros = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t groups = chi.size(0), channels = chi.size(1);
    auto sums = at::native_batch_norm_backward(grads[0], xf, scale, zeros, chi.view(-1), {}, {}, false, eps,
                                               {false, true, true});
    Tensor dot = std::get<1>(sums).view({groups, channels});
    Tensor grad_sum = std::get<2>(sums).view({groups, channels});
    scale = scale.view({groups, channels});
    Tensor psi = scale * dot / (xf.numel() / xf.size(1));
    Tensor psi_bar = psi;
    psi_window.select(0, ctx->saved_data["slot"].toInt()).copy_(psi);
    if (ctx->saved_data["use_sma"].toBool()) psi_bar = psi_window.mean(0);
    Tensor var = chi + eps;
    Tensor a = per_channel((scale * var.rsqrt()).reshape(-1), xf.dim());
    Tensor b = per_channel((psi_bar / var).reshape(-1), xf.dim());
    Tensor grad_x = torch::addcmul(grads[0] * a, xf, b, -1.0);
    if (!ctx->saved_data["affine"].toBool()) {
      return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    Tensor grad_weight = group_sum(r.defined() ? dot * r : dot);
    return {grad_x, grad_weight, group_sum(grad_sum), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

// One training step at host step `step` on the folded map xf (N/G, G*C, *S) with `groups` virtual batches, the
// windows already of G groups: writes the windows' slot, moves running_var and num_steps, returns the folded output.
Tensor train_step(const Tensor& xf, int64_t groups, const c10::optional<Tensor>& weight,
                  const c10::optional<Tensor>& bias, Tensor window_x2, Tensor window_psi, Tensor running_var,
                  Tensor num_steps, int64_t step, int64_t sma_window, int64_t sma_warmup, int64_t renorm_start,
                  double r_max, double momentum, double eps) {
  Tensor chi;
  {  // MovingAverageBatchNorm._second_moment
    torch::NoGradGuard no_grad;
    Tensor scratch = torch::zeros({xf.size(1)}, xf.options().dtype(torch::kFloat32));
    auto stats = at::batch_norm_update_stats(xf, scratch, {}, 0.0);
    chi = torch::addcmul(std::get<1>(stats), std::get<0>(stats), std::get<0>(stats));
  }
  chi = chi.view({groups, -1});
  const int64_t slot = step % sma_window;
  window_x2.select(0, slot).copy_(chi);
  const bool use_sma = step > sma_window && step >= sma_warmup;  // averages_at
  c10::optional<Tensor> r;
  {
    torch::NoGradGuard no_grad;
    if (use_sma) chi = window_x2.mean(0);
    if (step > std::max(renorm_start, sma_warmup)) {  // renormalizes_at
      r = ((chi + eps) / (running_var + eps)).sqrt_().clamp_(1.0 / r_max, r_max);
    }
    running_var.lerp_(group_mean(chi), momentum);
  }
  num_steps.add_(1);
  return MovingAverageBatchNormFn::apply(xf, weight, bias, chi, r, window_psi, slot, use_sma, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("train_step", &train_step); }
