// Device-generic parts of the INT8 family: argument checks, output allocation (also
// the Meta kernels), and the compositions quantize_int8 / scaled_int8_quant.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <stdexcept>

#include "ops/quant_int8.h"
#include "ops/checks.h"

namespace memwarden::ops {
namespace {

using quant::Granularity;

// The last dimension decides the scale layout, so it is specialised under
// torch.compile (a model's hidden size is fixed); leading dimensions stay symbolic.
int64_t last_dim(const at::Tensor& t) {
  return t.sym_size(-1).guard_int(__FILE__, __LINE__);
}

QuantShape layout_for(const char* op, const at::Tensor& t, Granularity granularity,
                      std::optional<int64_t> group_size) {
  const int64_t cols = last_dim(t);
  // Rows only size the scale tensor, which is allocated symbolically; 1 is enough to
  // validate group_size without specialising the leading dimensions.
  try {
    return {cols, quant::scale_layout(granularity, 1, cols, group_size.value_or(0))};
  } catch (const std::invalid_argument& e) {
    C10_THROW_ERROR(ValueError, std::string(op) + ": " + e.what());
  }
}

c10::SymInt sym_rows(const at::Tensor& t) {
  return t.dim() == 0 || t.sym_size(-1) == 0 ? c10::SymInt(0) : t.sym_numel() / t.sym_size(-1);
}

// Messages are built from strings, never by streaming numbers: with some toolchains
// (seen on the lent H100 image) the extension carries its own copy of libstdc++'s
// number formatting, which crashes on the locale of the one torch loaded. A symbolic
// size also has no number to show.
std::string sym_string(const c10::SymInt& value) {
  const auto concrete = value.maybe_as_int();
  return concrete ? std::to_string(*concrete) : std::string("<symbolic>");
}

// Expected number of scales, symbolic in the rows.
c10::SymInt expected_scales(const at::Tensor& like, Granularity granularity, const QuantShape& shape) {
  switch (granularity) {
    case Granularity::kTensor: return 1;
    case Granularity::kChannel: return shape.cols;
    case Granularity::kToken: return sym_rows(like);
    case Granularity::kGroup: return sym_rows(like) * shape.layout.row_stride;
  }
  return 0;
}

template <typename Op>
c10::TypedOperatorHandle<Op> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Op>();
}

}  // namespace

quant::Granularity parse_granularity_arg(const char* op, c10::string_view granularity) {
  try {
    return quant::parse_granularity(std::string(granularity));
  } catch (const std::invalid_argument& e) {
    C10_THROW_ERROR(ValueError, std::string(op) + ": " + e.what());
  }
}

quant::ScaleLayout concrete_layout(const at::Tensor& t, c10::string_view granularity,
                                   std::optional<int64_t> group_size) {
  const int64_t cols = t.size(-1);
  return quant::scale_layout(quant::parse_granularity(std::string(granularity)), cols == 0 ? 0 : t.numel() / cols, cols,
                             group_size.value_or(0));
}

QuantShape check_float_input(const char* op, const at::Tensor& input, Granularity granularity,
                             std::optional<int64_t> group_size) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": input must be torch.float32, torch.float16 or torch.bfloat16, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK_VALUE(input.is_contiguous(), op, ": input must be contiguous (call .contiguous() first)");
  return layout_for(op, input, granularity, group_size);
}

QuantShape check_int8_input(const char* op, const at::Tensor& q, Granularity granularity,
                            std::optional<int64_t> group_size) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, op, ": q must be torch.int8, got ", dtype_name(q.scalar_type()));
  TORCH_CHECK_VALUE(q.dim() >= 1, op, ": q must have at least one dimension");
  TORCH_CHECK_VALUE(q.is_contiguous(), op, ": q must be contiguous (call .contiguous() first)");
  return layout_for(op, q, granularity, group_size);
}

void check_scale(const char* op, const at::Tensor& like, const QuantShape& shape, const at::Tensor& scale,
                 const std::optional<at::Tensor>& zero_point, Granularity granularity) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": scale must be torch.float32, got ", dtype_name(scale.scalar_type()));
  TORCH_CHECK_VALUE(scale.device() == like.device(), op, ": scale must be on the input's device (", like.device(),
                    "), got ", scale.device());
  TORCH_CHECK_VALUE(scale.is_contiguous(), op, ": scale must be contiguous");
  const c10::SymInt expected = expected_scales(like, granularity, shape);
  TORCH_CHECK_VALUE(scale.sym_numel().sym_eq(expected).expect_true(__FILE__, __LINE__),
                  op, ": scale must have ", sym_string(expected), " elements for granularity '",
                  quant::granularity_name(granularity), "' and input shape ", shape_string(like), ", got shape ",
                  shape_string(scale));
  if (zero_point.has_value()) {
    const at::Tensor& zp = *zero_point;
    TORCH_CHECK_TYPE(zp.scalar_type() == at::kInt, op, ": azp (zero point) must be torch.int32, got ", dtype_name(zp.scalar_type()));
    TORCH_CHECK_VALUE(zp.device() == like.device(), op, ": azp must be on the input's device (", like.device(),
                      "), got ", zp.device());
    TORCH_CHECK_VALUE(zp.is_contiguous(), op, ": azp must be contiguous");
    TORCH_CHECK_VALUE(zp.sym_numel().sym_eq(scale.sym_numel()).expect_true(__FILE__, __LINE__), op, ": azp must have as many elements as scale (",
                    sym_string(scale.sym_numel()), "), got shape ", shape_string(zp));
  }
}

QuantResult quantize_int8_groups_outputs(const at::Tensor& input, int64_t group_size, bool symmetric) {
  constexpr const char* op = "quantize_int8_groups";
  const QuantShape shape = check_float_input(op, input, Granularity::kGroup, group_size);
  std::vector<c10::SymInt> scale_sizes(input.sym_sizes().begin(), input.sym_sizes().end());
  scale_sizes.back() = shape.layout.row_stride;
  at::Tensor q = at::empty_symint(input.sym_sizes(), input.options().dtype(at::kChar));
  at::Tensor scale = at::empty_symint(scale_sizes, input.options().dtype(at::kFloat));
  std::optional<at::Tensor> zero_point;
  if (!symmetric) zero_point = at::empty_symint(scale_sizes, input.options().dtype(at::kInt));
  return {q, scale, zero_point};
}

void quantize_int8_groups_out_check(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                    const at::Tensor& scale, const std::optional<at::Tensor>& azp) {
  constexpr const char* op = "quantize_int8_groups_out";
  // The shapes the functional op would allocate, worked out on the Meta device.
  check_float_input(op, input, Granularity::kGroup, group_size);
  const auto [want_q, want_scale, want_azp] = quantize_int8_groups_outputs(
      at::empty_symint(input.sym_sizes(), input.options().device(c10::kMeta)), group_size, !azp.has_value());
  auto check = [&](const char* name, const at::Tensor& out, const at::Tensor& want) {
    TORCH_CHECK_TYPE(out.scalar_type() == want.scalar_type(), op, ": ", name, " must be ", dtype_name(want.scalar_type()),
                     ", got ", dtype_name(out.scalar_type()));
    TORCH_CHECK_VALUE(out.device() == input.device(), op, ": ", name, " must be on the input's device (",
                      input.device(), "), got ", out.device());
    TORCH_CHECK_VALUE(out.sym_sizes().equals(want.sym_sizes()), op, ": ", name, " must have shape ",
                      shape_string(want), ", got ", shape_string(out));
    TORCH_CHECK_VALUE(out.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  check("q", q, want_q);
  check("scale", scale, want_scale);
  if (azp.has_value()) check("azp", *azp, *want_azp);
  check_outputs_independent(op, {{"q", &q}, {"scale", &scale}, {"azp", optional_arg(azp)}}, {{"input", &input}});
}

ParamsResult quantize_int8_params_outputs(const at::Tensor& input, c10::string_view granularity, bool symmetric) {
  constexpr const char* op = "quantize_int8_params";
  const Granularity g = parse_granularity_arg(op, granularity);
  TORCH_CHECK_VALUE(g == Granularity::kTensor || g == Granularity::kChannel, op,
                    ": granularity must be 'tensor' or 'channel' (per-token and per-group parameters come with "
                    "quantize_int8_groups), got '", quant::granularity_name(g), "'");
  const QuantShape shape = check_float_input(op, input, g, std::nullopt);
  const int64_t n = g == Granularity::kTensor ? 1 : shape.cols;
  at::Tensor scale = at::empty({n}, input.options().dtype(at::kFloat));
  std::optional<at::Tensor> zero_point;
  if (!symmetric) zero_point = at::empty({n}, input.options().dtype(at::kInt));
  return {scale, zero_point};
}

at::Tensor quantize_int8_static_outputs(const at::Tensor& input, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                     std::optional<int64_t> group_size) {
  constexpr const char* op = "quantize_int8_static";
  const Granularity g = parse_granularity_arg(op, granularity);
  const QuantShape shape = check_float_input(op, input, g, group_size);
  check_scale(op, input, shape, scale, zero_point, g);
  return at::empty_symint(input.sym_sizes(), input.options().dtype(at::kChar));
}

at::Tensor dequantize_int8_outputs(const at::Tensor& q, const at::Tensor& scale,
                                const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "dequantize_int8";
  const Granularity g = parse_granularity_arg(op, granularity);
  const QuantShape shape = check_int8_input(op, q, g, group_size);
  check_scale(op, q, shape, scale, zero_point, g);
  const at::ScalarType dtype = out_dtype.value_or(at::kHalf);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got ", dtype_name(dtype));
  return at::empty_symint(q.sym_sizes(), q.options().dtype(dtype));
}

QuantResult quantize_int8(const at::Tensor& input, c10::string_view granularity, std::optional<int64_t> group_size,
                          bool symmetric) {
  constexpr const char* op = "quantize_int8";
  const Granularity g = parse_granularity_arg(op, granularity);
  const QuantShape shape = check_float_input(op, input, g, group_size);
  if (g == Granularity::kToken || g == Granularity::kGroup) {
    static auto groups = find_op<QuantResult(const at::Tensor&, int64_t, bool)>("memwarden::quantize_int8_groups");
    auto [q, scale, zero_point] = groups.call(input, shape.layout.group_size, symmetric);
    return {q, scale, zero_point};
  }
  static auto params = find_op<ParamsResult(const at::Tensor&, c10::string_view, bool)>("memwarden::quantize_int8_params");
  auto [scale, zero_point] = params.call(input, granularity, symmetric);
  static auto apply = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, std::optional<int64_t>)>("memwarden::quantize_int8_static");
  at::Tensor q = apply.call(input, scale, zero_point, granularity, group_size);
  return {q, scale, zero_point};
}

QuantResult scaled_int8_quant(const at::Tensor& input, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& azp, bool symmetric) {
  constexpr const char* op = "scaled_int8_quant";
  if (!scale.has_value()) {
    TORCH_CHECK_VALUE(!azp.has_value(), op, ": azp is only accepted together with a static scale");
    auto [q, s, z] = quantize_int8(input, "token", std::nullopt, symmetric);
    // vLLM's shape: one scale per token, [num_tokens, 1].
    std::optional<at::Tensor> zero_point;
    if (z.has_value()) zero_point = z->reshape({-1, 1});
    return {q, s.reshape({-1, 1}), zero_point};
  }
  TORCH_CHECK_VALUE(symmetric == !azp.has_value(), op,
                    ": a static asymmetric quantization needs azp, and a symmetric one must not pass it "
                    "(symmetric=", symmetric ? "True" : "False", ", azp ", azp.has_value() ? "given" : "missing", ")");
  // quantize_int8_static itself takes scale 0 (an all-zero group of the dynamic path).
  check_static_scale(op, "scale", *scale);
  static auto apply = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, std::optional<int64_t>)>("memwarden::quantize_int8_static");
  at::Tensor q = apply.call(input, *scale, azp, "tensor", std::nullopt);
  return {q, *scale, azp};
}

}  // namespace memwarden::ops
