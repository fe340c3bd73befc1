// Instantiations of MLX's steel GEMM (steel_gemm_fused.h, unchanged, from the
// mlx-metal wheel) for the emulator's peer suite. Written for jax_mfa; the
// kernel names follow MLX's naming (steel_gemm_fused_<ta><tb>_<in>_<out>_bm.._bn.._bk.._wm.._wn..).
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/steel/gemm/gemm.h"
#include "mlx/backend/metal/kernels/steel/gemm/kernels/steel_gemm_fused.h"

#define JAX_MFA_GEMM(tname, trans_a, trans_b, iname, itype, bm, bn, bk, wm, wn)                              \
  instantiate_kernel("steel_gemm_fused_" #tname "_" #iname "_" #iname "_bm" #bm "_bn" #bn "_bk" #bk "_wm" #wm \
                     "_wn" #wn, gemm, itype, bm, bn, bk, wm, wn, trans_a, trans_b, float)

#define JAX_MFA_GEMM_TRANSPOSES(iname, itype, bm, bn, bk, wm, wn)  \
  JAX_MFA_GEMM(nn, false, false, iname, itype, bm, bn, bk, wm, wn) \
  JAX_MFA_GEMM(nt, false, true, iname, itype, bm, bn, bk, wm, wn)  \
  JAX_MFA_GEMM(tn, true, false, iname, itype, bm, bn, bk, wm, wn)  \
  JAX_MFA_GEMM(tt, true, true, iname, itype, bm, bn, bk, wm, wn)

JAX_MFA_GEMM_TRANSPOSES(float32, float, 32, 32, 16, 2, 2)
JAX_MFA_GEMM_TRANSPOSES(float16, half, 32, 32, 16, 2, 2)
JAX_MFA_GEMM_TRANSPOSES(bfloat16, bfloat, 32, 32, 16, 2, 2)
