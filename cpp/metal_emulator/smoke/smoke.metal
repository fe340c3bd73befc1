#include <metal_stdlib>
#include "jax_mfa_instantiate.h"
using namespace metal;

// y = a * x + y, in one threadgroup's worth of threadgroup memory.
template <typename T>
kernel void axpy(device const T* x [[buffer(0)]],
                 device T* y [[buffer(1)]],
                 constant float& a [[buffer(2)]],
                 threadgroup T* tmp [[threadgroup(0)]],
                 uint gid [[thread_position_in_grid]],
                 uint tid [[thread_index_in_threadgroup]]) {
  tmp[tid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[gid] = T(a * float(tmp[tid]) + float(y[gid]));
}
JAX_MFA_INSTANTIATE_KERNEL("axpy_float", axpy, float)
JAX_MFA_INSTANTIATE_KERNEL("axpy_half", axpy, half)

kernel void racy(device float* y [[buffer(0)]],
                 threadgroup float* tmp [[threadgroup(0)]],
                 uint tid [[thread_index_in_threadgroup]]) {
  tmp[tid] = 1.0f;
  y[tid] = tmp[31 - tid];
}
