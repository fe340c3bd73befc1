// Instantiations of MLX's sdpa_vector kernels (sdpa_vector.h, unchanged, from
// the mlx-metal wheel) for the emulator's peer suite. Written for jax_mfa;
// names follow MLX's (sdpa_vector_<type>_<qk dim>_<v dim>, sdpa_vector_2pass_1_..., sdpa_vector_2pass_2_...).
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/sdpa_vector.h"

#define JAX_MFA_SDPA_VECTOR(type, dim)                                                               \
  instantiate_kernel("sdpa_vector_" #type "_" #dim "_" #dim, sdpa_vector, type, dim, dim)             \
  instantiate_kernel("sdpa_vector_2pass_1_" #type "_" #dim "_" #dim, sdpa_vector_2pass_1, type, dim, dim) \
  instantiate_kernel("sdpa_vector_2pass_2_" #type "_" #dim, sdpa_vector_2pass_2, type, dim)

#define JAX_MFA_SDPA_VECTOR_TYPE(type) \
  JAX_MFA_SDPA_VECTOR(type, 64)        \
  JAX_MFA_SDPA_VECTOR(type, 128)

JAX_MFA_SDPA_VECTOR_TYPE(float)
JAX_MFA_SDPA_VECTOR_TYPE(float16_t)
JAX_MFA_SDPA_VECTOR_TYPE(bfloat16_t)
