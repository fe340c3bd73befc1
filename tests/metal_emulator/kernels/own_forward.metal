// One instantiation of the project's forward kernel (metal/attention_kernels.h)
// for the profile test (compiling all of metal/attention.metal takes longer).
#include <metal_stdlib>
#include "jax_mfa_instantiate.h"
#include "attention_params.h"
#include "attention_kernels.h"

JAX_MFA_INSTANTIATE_KERNEL("mfa_fwd_f32_h64_p16_c128_d32_cache1", attention_forward, float, 64, 16, 128,
                           32, true)
