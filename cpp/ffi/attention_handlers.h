// FFI handler symbols, one forward/backward pair per backend, and the backend
// dispatch they share.
#pragma once

#include "attention/backend.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mfa {

enum class Backend { Cpu, Metal, MetalEmulated };

Status backend_forward(Backend backend, const AttentionProblem& p, DType dtype,
                       const ForwardBuffers& b, TaskRunner& runner);
Status backend_backward(Backend backend, const AttentionProblem& p, DType dtype,
                        const BackwardBuffers& b, TaskRunner& runner);

XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionBackwardCpu);
#if JAX_MFA_HAS_METAL
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionForwardMetal);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionBackwardMetal);
#endif
#if JAX_MFA_HAS_METAL_EMULATED
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionForwardMetalEmulated);
XLA_FFI_DECLARE_HANDLER_SYMBOL(AttentionBackwardMetalEmulated);
#endif

}  // namespace jax_mfa
