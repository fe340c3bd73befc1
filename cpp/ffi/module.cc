// The Python extension module: hands the FFI handlers to jax.ffi and reports
// which backends this build and machine can run.
#include <nanobind/nanobind.h>

#include <nanobind/stl/tuple.h>

#include "../../metal/dropout_philox.h"
#include "ffi/attention_handlers.h"
#if JAX_MFA_HAS_METAL
#include "metal_host/metal_backend.h"
#endif

namespace nb = nanobind;

namespace {

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
