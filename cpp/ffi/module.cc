// The Python extension module: hands the FFI handlers to jax.ffi and reports
// which backends this build and machine can run.
#include <nanobind/nanobind.h>

#include <nanobind/ndarray.h>
#include <nanobind/stl/tuple.h>

#include <stdexcept>

#include "../../metal/dropout_philox.h"
#include "cpu/cpu_f32_tiles.h"
#include "ffi/attention_handlers.h"
#if JAX_MFA_HAS_METAL
#include "metal_host/metal_backend.h"
#endif

namespace nb = nanobind;

namespace {

using FlatFloats = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Raises ValueError unless element `last` (the largest index an operand's
// layout reaches) lies inside the array.
void check_reach(const char* name, const FlatFloats& x, int64_t last) {
  if (last < 0 || last >= int64_t(x.shape(0)))
    throw nb::value_error((std::string(name) + ": layout reaches element " +
                           std::to_string(last) + " of an array of " +
                           std::to_string(x.shape(0))).c_str());
}

template <typename T>
nb::capsule encapsulate_ffi_handler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "Encapsulated function must be an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_mfa, m) {
  m.doc() = "jax_mfa native extension: XLA FFI handlers for fused attention";
  // Target name -> FFI handler, registered on JAX's CPU platform by jax_mfa.
  m.def("registrations", [] {
    nb::dict d;
    d["jax_mfa_attention_fwd_cpu"] = encapsulate_ffi_handler(jax_mfa::AttentionForwardCpu);
    d["jax_mfa_attention_bwd_cpu"] = encapsulate_ffi_handler(jax_mfa::AttentionBackwardCpu);
#if JAX_MFA_HAS_METAL
    d["jax_mfa_attention_fwd_metal"] = encapsulate_ffi_handler(jax_mfa::AttentionForwardMetal);
    d["jax_mfa_attention_bwd_metal"] = encapsulate_ffi_handler(jax_mfa::AttentionBackwardMetal);
#endif
#if JAX_MFA_HAS_METAL_EMULATED
    d["jax_mfa_attention_fwd_metal_emulated"] =
        encapsulate_ffi_handler(jax_mfa::AttentionForwardMetalEmulated);
    d["jax_mfa_attention_bwd_metal_emulated"] =
        encapsulate_ffi_handler(jax_mfa::AttentionBackwardMetalEmulated);
#endif
    return d;
  });
  // The dropout generator as the kernels compile it (known-answer tests).
  m.def("philox4x32_10", [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
    const MfaPhilox4 r = mfa_philox4x32_10(MfaPhilox4{c0, c1, c2, c3}, k0, k1);
    return std::make_tuple(r.x, r.y, r.z, r.w);
  });
  // The float32 tile product and K^T packing of the CPU kernels
  // (cpu_f32_tiles.h), on flat arrays, for kernel-level tests.
  m.def("f32_tiles_available", &jax_mfa::cpu::f32_tiles_available);
  m.def("f32_tile_product", [](int64_t M, int64_t N, int64_t K, float alpha, FlatFloats a,
                               int64_t a_row, int64_t a_col, FlatFloats b, int64_t b_row,
                               int64_t b_panel, bool accumulate, FlatFloats c, int64_t ldc) {
    if (M <= 0 || N <= 0 || K <= 0) throw nb::value_error("M, N and K must be positive");
    check_reach("a", a, (M - 1) * a_row + (K - 1) * a_col);
    const int64_t b_last = b_row == 16 ? (K - 1) * 16 + 15 : (K - 1) * b_row + (N - 1) % 16;
    check_reach("b", b, (N - 1) / 16 * b_panel + b_last);
    check_reach("c", c, (M - 1) * ldc + N - 1);
    jax_mfa::cpu::f32_gemm(M, N, K, alpha, a.data(), a_row, a_col, b.data(), b_row, b_panel,
                           accumulate, c.data(), ldc);
  });
  m.def("pack_panels", [](FlatFloats src, int64_t stride, int64_t n, int64_t K, FlatFloats dst) {
    if (n <= 0 || K <= 0) throw nb::value_error("n and K must be positive");
    check_reach("src", src, (n - 1) * stride + K - 1);
    check_reach("dst", dst, (n + 15) / 16 * 16 * K - 1);
    jax_mfa::cpu::pack_panels(src.data(), stride, n, K, dst.data());
  });
  // (available, reason, device): available when this build has the Metal
  // backend, the machine an Apple-silicon GPU, and Apple's compiler accepted
  // the kernels (checked at run time, once); otherwise the reason.
  m.def("metal_diagnostics", [] {
#if JAX_MFA_HAS_METAL
    const jax_mfa::MetalDiagnostics d = jax_mfa::metal_diagnostics();
    return nb::make_tuple(d.available, d.reason, d.device);
#else
    return nb::make_tuple(false, "this build has no Metal backend (it is built on macOS only)",
                          "");
#endif
  });
}
