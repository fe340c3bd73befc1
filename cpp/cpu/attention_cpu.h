// Fused FlashAttention kernels for the CPU: tiled online-softmax forward and a
// recomputing backward, parallel over XLA's intra-op thread pool.
#pragma once

#include "attention/backend.h"

namespace jax_mfa {

Status cpu_attention_forward(const AttentionProblem& p, DType dtype, const ForwardBuffers& b,
                             TaskRunner& runner);
Status cpu_attention_backward(const AttentionProblem& p, DType dtype, const BackwardBuffers& b,
                              TaskRunner& runner);

}  // namespace jax_mfa
