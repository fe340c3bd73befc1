// The Python extension module: hands the FFI handlers to jax.ffi and reports
// which backends this build and machine can run.
#include <nanobind/nanobind.h>

#include "ffi/attention_handlers.h"

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
    return d;
  });
}
