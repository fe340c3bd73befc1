// Instantiations of MLX's steel attention forward (steel_attention.h,
// unchanged, from the mlx-metal wheel) for the emulator's peer suite. Written
// for jax_mfa; names follow MLX's (steel_attention_<type>_bq.._bk.._bd.._wm.._wn.._mask<mask type>).
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/steel/attn/kernels/steel_attention.h"

#define JAX_MFA_ATTN(tname, dtype, bq, bk, bd, wm, wn, mname, mtype)                                          \
  instantiate_kernel("steel_attention_" #tname "_bq" #bq "_bk" #bk "_bd" #bd "_wm" #wm "_wn" #wn "_mask" #mname, \
                     attention, dtype, bq, bk, bd, bd, wm, wn, mtype, float)

// MLX's block choice: bq 32, bk 32 for D < 128 and 16 for D >= 128, 4 x 1 simdgroups.
#define JAX_MFA_ATTN_TYPE(tname, dtype)                       \
  JAX_MFA_ATTN(tname, dtype, 32, 32, 64, 4, 1, tname, dtype)  \
  JAX_MFA_ATTN(tname, dtype, 32, 32, 64, 4, 1, bool_, bool)   \
  JAX_MFA_ATTN(tname, dtype, 32, 16, 128, 4, 1, tname, dtype) \
  JAX_MFA_ATTN(tname, dtype, 32, 16, 128, 4, 1, bool_, bool)

JAX_MFA_ATTN_TYPE(float32, float)
JAX_MFA_ATTN_TYPE(float16, half)
JAX_MFA_ATTN_TYPE(bfloat16, bfloat16_t)
