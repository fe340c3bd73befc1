// Entry points of the Metal backends, called by the FFI handlers.
//
// "metal" (Apple only, JAX_MFA_HAS_METAL): the kernels of metal/ on the
// system's Apple-silicon GPU (metal_backend.mm).
// "metal-emulated" (everywhere, JAX_MFA_HAS_METAL_EMULATED): the same kernels
// run by the Metal emulator with all its checkers on (emulated_backend.cc).
// Both share the launch plan of attention_plan.h.
#pragma once

#include "attention/backend.h"
#include "common/parallel.h"

#include <string>

namespace jax_mfa {

#if JAX_MFA_HAS_METAL
// "Available" means usable: a Metal device of the Apple7 family or later (M1+)
// was found AND Apple's compiler built the kernels (one library as the
// probe). Otherwise `reason` says which step failed.
struct MetalDiagnostics {
  bool available = false;
  std::string device;  // the chosen GPU's name, when one was found
  std::string reason;  // empty when available
};
MetalDiagnostics metal_diagnostics();
Status metal_attention_forward(const AttentionProblem& p, DType dtype, const ForwardBuffers& b);
Status metal_attention_backward(const AttentionProblem& p, DType dtype, const BackwardBuffers& b);
#endif

#if JAX_MFA_HAS_METAL_EMULATED
// The emulated GPU family (block-size tables) comes from the environment
// variable JAX_MFA_EMULATED_FAMILY: "apple7" (M1/M2) or "apple9" (M3+, default).
Status metal_emulated_attention_forward(const AttentionProblem& p, DType dtype,
                                        const ForwardBuffers& b, TaskRunner& runner);
Status metal_emulated_attention_backward(const AttentionProblem& p, DType dtype,
                                         const BackwardBuffers& b, TaskRunner& runner);
#endif

}  // namespace jax_mfa
