// XLA FFI handlers: decode buffers and attributes into an AttentionProblem,
// validate everything a kernel relies on (returning ffi::Error, never
// crashing), and hand the work to a backend.
#include "ffi/attention_handlers.h"

#include <cmath>
#include <string>

#include "attention/backend.h"
#include "attention/problem.h"
#include "cpu/attention_cpu.h"
#include "../../metal/dropout_philox.h"
#if JAX_MFA_HAS_METAL || JAX_MFA_HAS_METAL_EMULATED
#include "metal_host/metal_backend.h"
#endif

namespace ffi = xla::ffi;

namespace jax_mfa {
namespace {

// Adapts XLA's intra-op thread pool to the kernels' TaskRunner.
class XlaThreadPoolRunner final : public TaskRunner {
 public:
  explicit XlaThreadPoolRunner(ffi::ThreadPool pool) : pool_(pool) {}
  int64_t num_workers() const override { return pool_.num_threads(); }
  void schedule(std::function<void()> task) override { pool_.Schedule(std::move(task)); }

 private:
  ffi::ThreadPool pool_;
};

ffi::Error invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("jax_mfa: " + message);
}

std::optional<DType> storage_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return DType::F32;
    case ffi::DataType::F16: return DType::F16;
    case ffi::DataType::BF16: return DType::BF16;
    case ffi::DataType::F64: return DType::F64;
    default: return std::nullopt;
  }
}

ffi::DataType accumulation_dtype(DType d) {
  return d == DType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

std::string shape_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

// Everything static about the call, from the FFI attributes.
struct Options {
  double scale, softcap;
  bool is_causal;
  int64_t window_left, window_right;
  bool has_bias, has_mask, has_q_lengths, has_kv_lengths;
  bool has_segment_ids, has_sinks;
  double dropout_rate;
  int64_t dropout_threshold;
  bool dropout_broadcast_heads;
};

// The operands forward and backward share, in the primitives' order.
struct Inputs {
  ffi::AnyBuffer q, k, v, bias, mask, q_lengths, kv_lengths, q_segments, kv_segments, sinks,
      dropout_seed;
};

// Segment ids, sinks and dropout: shapes, dtypes and the rate.
ffi::Error decode_new_features(const Options& o, const Inputs& in, DType dtype,
                               AttentionProblem& p) {
  p.has_segment_ids = o.has_segment_ids;
  if (o.has_segment_ids) {
    for (auto [buf, len, name] : {std::tuple{in.q_segments, p.q_len, "query_segment_ids"},
                                  std::tuple{in.kv_segments, p.kv_len, "key_value_segment_ids"}}) {
      auto d = buf.dimensions();
      if (buf.element_type() != ffi::DataType::S32 || d.size() != 2 || d[0] != p.batch ||
          d[1] != len)
        return invalid(std::string(name) + " must be int32 of shape (B, " +
                       (len == p.q_len ? "T" : "S") + "), got " + shape_string(d));
    }
  }
  p.has_sinks = o.has_sinks;
  if (o.has_sinks) {
    auto d = in.sinks.dimensions();
    if (in.sinks.element_type() != accumulation_dtype(dtype) || d.size() != 2 ||
        (d[0] != 1 && d[0] != p.batch) || d[1] != p.q_heads)
      return invalid("sinks must be float32 (float64 for float64 inputs) of shape (1|B, N), got " +
                     shape_string(d));
    p.sinks_batch = d[0];
  }
  if (!(o.dropout_rate >= 0.0 && o.dropout_rate < 1.0))
    return invalid("dropout_rate must be in [0, 1)");
  if (o.dropout_threshold < 0 || o.dropout_threshold > int64_t(0xffffffff))
    return invalid("dropout_threshold must fit in 32 bits");
  p.dropout_rate = o.dropout_rate;
  p.dropout_threshold = uint32_t(o.dropout_threshold);
  p.dropout_broadcast_heads = o.dropout_broadcast_heads;
  if (p.has_dropout()) {
    auto d = in.dropout_seed.dimensions();
    if (in.dropout_seed.element_type() != ffi::DataType::U32 || d.size() != 2 ||
        d[0] != p.batch || d[1] != MFA_DROPOUT_SEED_WORDS)
      return invalid("dropout seed must be uint32 of shape (B, " +
                     std::to_string(MFA_DROPOUT_SEED_WORDS) + "), got " + shape_string(d));
  }
  return ffi::Error::Success();
}

// Decodes and checks the operands shared by forward and backward.
ffi::Error decode_problem(const Options& o, const Inputs& in, AttentionProblem& p,
                          DType& dtype) {
  const ffi::AnyBuffer &q = in.q, &k = in.k, &v = in.v, &bias = in.bias, &mask = in.mask;
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return invalid("query, key and value must be rank 4 (B, T|S, N|K, H)");
  auto dt = storage_dtype(q.element_type());
  if (!dt) return invalid("query dtype must be float32, float16, bfloat16 or float64");
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return invalid("query, key and value must share one dtype");
  for (int d = 0; d < 4; ++d)
    if (kd[d] != vd[d]) return invalid("key " + shape_string(kd) + " and value " +
                                       shape_string(vd) + " must have the same shape");
  if (kd[0] != qd[0] || kd[3] != qd[3])
    return invalid("key " + shape_string(kd) + " must match query " + shape_string(qd) +
                   " in batch and head dim");
  if (kd[2] <= 0 || qd[2] % kd[2] != 0)
    return invalid("query heads must be a multiple of key/value heads");
  if (qd[3] < 1) return invalid("head dim must be at least 1");
  if (!(o.scale == o.scale) || !std::isfinite(o.scale)) return invalid("scale must be finite");
  if (o.softcap < 0) return invalid("softcap must be positive");

  p = AttentionProblem{};
  dtype = *dt;
  p.batch = qd[0];
  p.q_len = qd[1];
  p.q_heads = qd[2];
  p.head_dim = qd[3];
  p.kv_len = kd[1];
  p.kv_heads = kd[2];
  p.scale = o.scale;
  p.softcap = o.softcap;
  p.causal = o.is_causal;
  p.window_left = o.window_left;
  p.window_right = o.window_right;

  const int64_t full[4] = {p.batch, p.q_heads, p.q_len, p.kv_len};
  if (o.has_bias) {
    auto bd = bias.dimensions();
    if (bias.element_type() != accumulation_dtype(dtype))
      return invalid("bias must be float32 (float64 for float64 inputs)");
    if (bd.size() != 4 || !p.bias.set_shape(bd.begin(), full))
      return invalid("bias " + shape_string(bd) + " is not broadcastable to (B, N, T, S)");
  }
  if (o.has_mask) {
    auto md = mask.dimensions();
    if (mask.element_type() != ffi::DataType::PRED) return invalid("mask must be bool");
    if (md.size() != 4 || !p.mask.set_shape(md.begin(), full))
      return invalid("mask " + shape_string(md) + " is not broadcastable to (B, N, T, S)");
  }
  p.has_q_lengths = o.has_q_lengths;
  p.has_kv_lengths = o.has_kv_lengths;
  for (auto [present, buf, name] : {std::tuple{o.has_q_lengths, in.q_lengths, "query_seq_lengths"},
                                    std::tuple{o.has_kv_lengths, in.kv_lengths,
                                               "key_value_seq_lengths"}}) {
    if (!present) continue;
    if (buf.element_type() != ffi::DataType::S32 || buf.element_count() != size_t(p.batch))
      return invalid(std::string(name) + " must be int32 of shape (B,)");
  }
  return decode_new_features(o, in, dtype, p);
}

ffi::Error expect_shape(ffi::AnyBuffer::Dimensions got, std::initializer_list<int64_t> want,
                        ffi::DataType got_type, ffi::DataType want_type, const char* name) {
  bool ok = got.size() == want.size() && got_type == want_type;
  size_t d = 0;
  for (int64_t w : want) ok = ok && got[d++] == w;
  if (!ok) return invalid(std::string(name) + " has an unexpected shape or dtype " + shape_string(got));
  return ffi::Error::Success();
}

ffi::Error to_ffi(const Status& s) {
  return s.ok() ? ffi::Error::Success() : ffi::Error::Internal("jax_mfa: " + s.message);
}

template <typename T>
const T* if_present(bool present, ffi::AnyBuffer b) {
  return present ? reinterpret_cast<const T*>(b.untyped_data()) : nullptr;
}

void set_operands(const Options& o, const Inputs& in, OperandBuffers& b) {
  b.q = in.q.untyped_data();
  b.k = in.k.untyped_data();
  b.v = in.v.untyped_data();
  b.bias = if_present<void>(o.has_bias, in.bias);
  b.mask = if_present<bool>(o.has_mask, in.mask);
  b.q_lengths = if_present<int32_t>(o.has_q_lengths, in.q_lengths);
  b.kv_lengths = if_present<int32_t>(o.has_kv_lengths, in.kv_lengths);
  b.q_segments = if_present<int32_t>(o.has_segment_ids, in.q_segments);
  b.kv_segments = if_present<int32_t>(o.has_segment_ids, in.kv_segments);
  b.sinks = if_present<void>(o.has_sinks, in.sinks);
  b.dropout_seed = if_present<uint32_t>(o.dropout_rate > 0.0, in.dropout_seed);
}

ffi::Error forward_impl(Backend backend, ffi::ThreadPool pool, const Options& o,
                        const Inputs& in, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse) {
  AttentionProblem p;
  DType dtype;
  if (auto e = decode_problem(o, in, p, dtype); e.failure()) return e;
  const ffi::AnyBuffer& q = in.q;
  if (auto e = expect_shape(out->dimensions(), {p.batch, p.q_len, p.q_heads, p.head_dim},
                            out->element_type(), q.element_type(), "out");
      e.failure())
    return e;
  if (auto e = expect_shape(lse->dimensions(), {p.batch, p.q_len, p.q_heads}, lse->element_type(),
                            accumulation_dtype(dtype), "lse");
      e.failure())
    return e;

  ForwardBuffers b;
  set_operands(o, in, b);
  b.out = out->untyped_data();
  b.lse = lse->untyped_data();
  XlaThreadPoolRunner runner(pool);
  return to_ffi(backend_forward(backend, p, dtype, b, runner));
}

ffi::Error backward_impl(Backend backend, ffi::ThreadPool pool, const Options& o,
                         const Inputs& in, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                         ffi::AnyBuffer delta, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                         ffi::Result<ffi::AnyBuffer> dbias) {
  AttentionProblem p;
  DType dtype;
  if (auto e = decode_problem(o, in, p, dtype); e.failure()) return e;
  const ffi::AnyBuffer& q = in.q;
  const auto acc = accumulation_dtype(dtype);
  const auto st = q.element_type();
  for (auto e : {
           expect_shape(lse.dimensions(), {p.batch, p.q_len, p.q_heads}, lse.element_type(), acc, "lse"),
           expect_shape(delta.dimensions(), {p.batch, p.q_len, p.q_heads}, delta.element_type(), acc, "delta"),
           expect_shape(dout.dimensions(), {p.batch, p.q_len, p.q_heads, p.head_dim}, dout.element_type(), st, "dout"),
           expect_shape(dq->dimensions(), {p.batch, p.q_len, p.q_heads, p.head_dim}, dq->element_type(), st, "dq"),
           expect_shape(dk->dimensions(), {p.batch, p.kv_len, p.kv_heads, p.head_dim}, dk->element_type(), st, "dk"),
           expect_shape(dv->dimensions(), {p.batch, p.kv_len, p.kv_heads, p.head_dim}, dv->element_type(), st, "dv"),
       })
    if (e.failure()) return e;
  if (o.has_bias && (dbias->element_count() != size_t(p.bias.size()) || dbias->element_type() != acc))
    return invalid("dbias must have the bias's shape and dtype");

  BackwardBuffers b;
  set_operands(o, in, b);
  b.lse = lse.untyped_data();
  b.dout = dout.untyped_data();
  b.delta = delta.untyped_data();
  b.dq = dq->untyped_data();
  b.dk = dk->untyped_data();
  b.dv = dv->untyped_data();
  b.dbias = o.has_bias ? dbias->untyped_data() : nullptr;
  XlaThreadPoolRunner runner(pool);
  return to_ffi(backend_backward(backend, p, dtype, b, runner));
}

}  // namespace

Status backend_forward(Backend backend, const AttentionProblem& p, DType dtype,
                       const ForwardBuffers& b, TaskRunner& runner) {
  switch (backend) {
    case Backend::Cpu: return cpu_attention_forward(p, dtype, b, runner);
    case Backend::Metal:
#if JAX_MFA_HAS_METAL
      return metal_attention_forward(p, dtype, b);
#else
      break;
#endif
    case Backend::MetalEmulated:
#if JAX_MFA_HAS_METAL_EMULATED
      return metal_emulated_attention_forward(p, dtype, b, runner);
#else
      break;
#endif
  }
  return Status::Error("unknown backend");
}

Status backend_backward(Backend backend, const AttentionProblem& p, DType dtype,
                        const BackwardBuffers& b, TaskRunner& runner) {
  switch (backend) {
    case Backend::Cpu: return cpu_attention_backward(p, dtype, b, runner);
    case Backend::Metal:
#if JAX_MFA_HAS_METAL
      return metal_attention_backward(p, dtype, b);
#else
      break;
#endif
    case Backend::MetalEmulated:
#if JAX_MFA_HAS_METAL_EMULATED
      return metal_emulated_attention_backward(p, dtype, b, runner);
#else
      break;
#endif
  }
  return Status::Error("unknown backend");
}

// One pair of handler symbols per backend; the binding is shared. Operands:
// q, k, v, bias, mask, q_lengths, kv_lengths, q_segments, kv_segments, sinks,
// dropout_seed (absent ones are placeholders, see the has_* attributes).
#define JAX_MFA_ATTRS                                                                     \
  .Attr<double>("scale")                                                                  \
      .Attr<double>("softcap")                                                            \
      .Attr<bool>("is_causal")                                                            \
      .Attr<int64_t>("window_left")                                                       \
      .Attr<int64_t>("window_right")                                                      \
      .Attr<bool>("has_bias")                                                             \
      .Attr<bool>("has_mask")                                                             \
      .Attr<bool>("has_q_lengths")                                                        \
      .Attr<bool>("has_kv_lengths")                                                       \
      .Attr<bool>("has_segment_ids")                                                      \
      .Attr<bool>("has_sinks")                                                            \
      .Attr<double>("dropout_rate")                                                       \
      .Attr<int64_t>("dropout_threshold")                                                 \
      .Attr<bool>("dropout_broadcast_heads")

#define JAX_MFA_OPTION_PARAMS                                                             \
  ffi::ThreadPool pool, double scale, double softcap, bool causal, int64_t wl, int64_t wr, \
      bool hb, bool hm, bool hq, bool hk, bool hs, bool hsk, double rate, int64_t thr,     \
      bool bcast
#define JAX_MFA_OPTIONS Options{scale, softcap, causal, wl, wr, hb, hm, hq, hk, hs, hsk, rate, thr, bcast}
#define JAX_MFA_INPUT_PARAMS                                                              \
  ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias,               \
      ffi::AnyBuffer mask, ffi::AnyBuffer ql, ffi::AnyBuffer kl, ffi::AnyBuffer qs,        \
      ffi::AnyBuffer ks, ffi::AnyBuffer sinks, ffi::AnyBuffer seed
#define JAX_MFA_INPUTS Inputs{q, k, v, bias, mask, ql, kl, qs, ks, sinks, seed}
#define JAX_MFA_INPUT_ARGS                                                                \
  .Arg<ffi::AnyBuffer>()                                                                   \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                               \
      .Arg<ffi::AnyBuffer>()

#define JAX_MFA_DEFINE_HANDLERS(BACKEND, FWD_SYMBOL, BWD_SYMBOL)                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      FWD_SYMBOL,                                                                          \
      ([](JAX_MFA_OPTION_PARAMS, JAX_MFA_INPUT_PARAMS, ffi::Result<ffi::AnyBuffer> out,     \
          ffi::Result<ffi::AnyBuffer> lse) {                                               \
        return forward_impl(BACKEND, pool, JAX_MFA_OPTIONS, JAX_MFA_INPUTS, out, lse);      \
      }),                                                                                  \
      ffi::Ffi::Bind()                                                                     \
          .Ctx<ffi::ThreadPool>() JAX_MFA_ATTRS JAX_MFA_INPUT_ARGS                         \
          .Ret<ffi::AnyBuffer>()                                                           \
          .Ret<ffi::AnyBuffer>());                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      BWD_SYMBOL,                                                                          \
      ([](JAX_MFA_OPTION_PARAMS, JAX_MFA_INPUT_PARAMS, ffi::AnyBuffer lse,                 \
          ffi::AnyBuffer dout, ffi::AnyBuffer delta, ffi::Result<ffi::AnyBuffer> dq,        \
          ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,                  \
          ffi::Result<ffi::AnyBuffer> dbias) {                                             \
        return backward_impl(BACKEND, pool, JAX_MFA_OPTIONS, JAX_MFA_INPUTS, lse, dout,     \
                             delta, dq, dk, dv, dbias);                                    \
      }),                                                                                  \
      ffi::Ffi::Bind()                                                                     \
          .Ctx<ffi::ThreadPool>() JAX_MFA_ATTRS JAX_MFA_INPUT_ARGS                         \
          .Arg<ffi::AnyBuffer>()                                                           \
          .Arg<ffi::AnyBuffer>()                                                           \
          .Arg<ffi::AnyBuffer>()                                                           \
          .Ret<ffi::AnyBuffer>()                                                           \
          .Ret<ffi::AnyBuffer>()                                                           \
          .Ret<ffi::AnyBuffer>()                                                           \
          .Ret<ffi::AnyBuffer>())

JAX_MFA_DEFINE_HANDLERS(Backend::Cpu, AttentionForwardCpu, AttentionBackwardCpu);
#if JAX_MFA_HAS_METAL
JAX_MFA_DEFINE_HANDLERS(Backend::Metal, AttentionForwardMetal, AttentionBackwardMetal);
#endif
#if JAX_MFA_HAS_METAL_EMULATED
JAX_MFA_DEFINE_HANDLERS(Backend::MetalEmulated, AttentionForwardMetalEmulated,
                        AttentionBackwardMetalEmulated);
#endif

}  // namespace jax_mfa
