// Host-named instantiations of the attention kernels (metal/attention_kernels.h):
// one per storage type and per block configuration the descriptor tables in
// cpp/metal_host/attention_plan.cc can choose. Names follow
// mfa_<fwd|dq|dkdv>_<f32|f16|bf16>_h<HP>_p<P>_c<C>_d<DB>[_o<HO>]_cache<flags> (HO: a
// dK/dV head split; flags: the register-cache policy, 1 for an operand kept in
// registers, in the kernel's order: Q; Q, dO; K, V),
// mfa_decode_<type>_h<HP>_c<C>, mfa_decode_merge_<type> and mfa_dkdv_reduce_<type>
// (the sum of a split GQA group's partial dK/dV).
//
// JAX_MFA_METAL_FAMILIES selects the table sets compiled in: bit 0 the M1/M2
// (Apple7) tables, bit 1 the M3+ (Apple9) tables; default both.
// JAX_MFA_METAL_DTYPES selects storage types: bit 0 float, 1 half, 2 bfloat16
// (the emulated build compiles one translation unit per type, in parallel).
// JAX_MFA_METAL_HEADS selects head-dim buckets: bit i for the i-th of
// kHeadBuckets in cpp/metal_host/attention_plan.h (every multiple of 8 from 16
// to 256); default all. The Metal launcher compiles one (type, bucket) library
// at a time, on first use (library_macros() in host_policy.h). The lists
// below follow the plan's tables: tools/metal_instantiations.py writes them from
// the plan (test_each_library_compiles_exactly_its_kernels in tests/host checks
// every library against them).
#include <metal_stdlib>
#ifndef JAX_MFA_EMBEDDED
#include "jax_mfa_instantiate.h"
#include "attention_params.h"
#include "attention_kernels.h"
#include "attention_decode.h"
#endif

#ifndef JAX_MFA_METAL_FAMILIES
#define JAX_MFA_METAL_FAMILIES 3
#endif
#ifndef JAX_MFA_METAL_DTYPES
#define JAX_MFA_METAL_DTYPES 7
#endif
#ifndef JAX_MFA_METAL_HEADS
#define JAX_MFA_METAL_HEADS 2147483647
#endif

// MFA_IF_H<HP>(x): x if bucket HP is selected, else nothing.
#if JAX_MFA_METAL_HEADS & 1
#define MFA_IF_H16(x) x
#else
#define MFA_IF_H16(x)
#endif
#if JAX_MFA_METAL_HEADS & 2
#define MFA_IF_H24(x) x
#else
#define MFA_IF_H24(x)
#endif
#if JAX_MFA_METAL_HEADS & 4
#define MFA_IF_H32(x) x
#else
#define MFA_IF_H32(x)
#endif
#if JAX_MFA_METAL_HEADS & 8
#define MFA_IF_H40(x) x
#else
#define MFA_IF_H40(x)
#endif
#if JAX_MFA_METAL_HEADS & 16
#define MFA_IF_H48(x) x
#else
#define MFA_IF_H48(x)
#endif
#if JAX_MFA_METAL_HEADS & 32
#define MFA_IF_H56(x) x
#else
#define MFA_IF_H56(x)
#endif
#if JAX_MFA_METAL_HEADS & 64
#define MFA_IF_H64(x) x
#else
#define MFA_IF_H64(x)
#endif
#if JAX_MFA_METAL_HEADS & 128
#define MFA_IF_H72(x) x
#else
#define MFA_IF_H72(x)
#endif
#if JAX_MFA_METAL_HEADS & 256
#define MFA_IF_H80(x) x
#else
#define MFA_IF_H80(x)
#endif
#if JAX_MFA_METAL_HEADS & 512
#define MFA_IF_H88(x) x
#else
#define MFA_IF_H88(x)
#endif
#if JAX_MFA_METAL_HEADS & 1024
#define MFA_IF_H96(x) x
#else
#define MFA_IF_H96(x)
#endif
#if JAX_MFA_METAL_HEADS & 2048
#define MFA_IF_H104(x) x
#else
#define MFA_IF_H104(x)
#endif
#if JAX_MFA_METAL_HEADS & 4096
#define MFA_IF_H112(x) x
#else
#define MFA_IF_H112(x)
#endif
#if JAX_MFA_METAL_HEADS & 8192
#define MFA_IF_H120(x) x
#else
#define MFA_IF_H120(x)
#endif
#if JAX_MFA_METAL_HEADS & 16384
#define MFA_IF_H128(x) x
#else
#define MFA_IF_H128(x)
#endif
#if JAX_MFA_METAL_HEADS & 32768
#define MFA_IF_H136(x) x
#else
#define MFA_IF_H136(x)
#endif
#if JAX_MFA_METAL_HEADS & 65536
#define MFA_IF_H144(x) x
#else
#define MFA_IF_H144(x)
#endif
#if JAX_MFA_METAL_HEADS & 131072
#define MFA_IF_H152(x) x
#else
#define MFA_IF_H152(x)
#endif
#if JAX_MFA_METAL_HEADS & 262144
#define MFA_IF_H160(x) x
#else
#define MFA_IF_H160(x)
#endif
#if JAX_MFA_METAL_HEADS & 524288
#define MFA_IF_H168(x) x
#else
#define MFA_IF_H168(x)
#endif
#if JAX_MFA_METAL_HEADS & 1048576
#define MFA_IF_H176(x) x
#else
#define MFA_IF_H176(x)
#endif
#if JAX_MFA_METAL_HEADS & 2097152
#define MFA_IF_H184(x) x
#else
#define MFA_IF_H184(x)
#endif
#if JAX_MFA_METAL_HEADS & 4194304
#define MFA_IF_H192(x) x
#else
#define MFA_IF_H192(x)
#endif
#if JAX_MFA_METAL_HEADS & 8388608
#define MFA_IF_H200(x) x
#else
#define MFA_IF_H200(x)
#endif
#if JAX_MFA_METAL_HEADS & 16777216
#define MFA_IF_H208(x) x
#else
#define MFA_IF_H208(x)
#endif
#if JAX_MFA_METAL_HEADS & 33554432
#define MFA_IF_H216(x) x
#else
#define MFA_IF_H216(x)
#endif
#if JAX_MFA_METAL_HEADS & 67108864
#define MFA_IF_H224(x) x
#else
#define MFA_IF_H224(x)
#endif
#if JAX_MFA_METAL_HEADS & 134217728
#define MFA_IF_H232(x) x
#else
#define MFA_IF_H232(x)
#endif
#if JAX_MFA_METAL_HEADS & 268435456
#define MFA_IF_H240(x) x
#else
#define MFA_IF_H240(x)
#endif
#if JAX_MFA_METAL_HEADS & 536870912
#define MFA_IF_H248(x) x
#else
#define MFA_IF_H248(x)
#endif
#if JAX_MFA_METAL_HEADS & 1073741824
#define MFA_IF_H256(x) x
#else
#define MFA_IF_H256(x)
#endif

#define MFA_NAME(KIND, TAG, HP, P, C, DB) \
  "mfa_" #KIND "_" #TAG "_h" #HP "_p" #P "_c" #C "_d" #DB
// Register-cache flags (0 or 1) as template arguments.
#define MFA_BOOL_0 false
#define MFA_BOOL_1 true

#define MFA_FWD(T, TAG, HP, P, C, DB, CQ)                                                  \
  MFA_IF_H##HP(JAX_MFA_INSTANTIATE_KERNEL(MFA_NAME(fwd, TAG, HP, P, C, DB) "_cache" #CQ,    \
                                          attention_forward, T, HP, P, C, DB, MFA_BOOL_##CQ))
#define MFA_DQ(T, TAG, HP, P, C, DB, CQ, CDO)                                              \
  MFA_IF_H##HP(JAX_MFA_INSTANTIATE_KERNEL(MFA_NAME(dq, TAG, HP, P, C, DB) "_cache" #CQ #CDO, \
                                          attention_backward_query, T, HP, P, C, DB,        \
                                          MFA_BOOL_##CQ, MFA_BOOL_##CDO))
#define MFA_DKDV(T, TAG, HP, P, C, DB, CK, CV)                                             \
  MFA_IF_H##HP(JAX_MFA_INSTANTIATE_KERNEL(MFA_NAME(dkdv, TAG, HP, P, C, DB) "_cache" #CK #CV, \
                                          attention_backward_key_value, T, HP, P, C, DB, HP, \
                                          MFA_BOOL_##CK, MFA_BOOL_##CV))
// dK/dV owning HO of the HP head columns of dK and dV (the plan's head split).
#define MFA_DKDV_SPLIT(T, TAG, HP, P, C, DB, HO, CK, CV)                                   \
  MFA_IF_H##HP(JAX_MFA_INSTANTIATE_KERNEL(                                                 \
      MFA_NAME(dkdv, TAG, HP, P, C, DB) "_o" #HO "_cache" #CK #CV,                          \
      attention_backward_key_value, T, HP, P, C, DB, HO, MFA_BOOL_##CK, MFA_BOOL_##CV))

// M3 and later (Apple9): metal-flash-attention's mixed-precision tables
// (float16 / bfloat16 storage) and its float32 tables (float32 storage), with
// the register-budget changes listed in attention_plan.cc.
#define MFA_APPLE9_MIXED(T, TAG) \
  MFA_FWD(T, TAG, 16, 16, 128, 16, 1) MFA_FWD(T, TAG, 24, 16, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 32, 16, 128, 16, 1) MFA_FWD(T, TAG, 40, 16, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 48, 16, 128, 24, 1) MFA_FWD(T, TAG, 56, 16, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 64, 16, 128, 32, 1) MFA_FWD(T, TAG, 72, 16, 128, 24, 1)                    \
  MFA_FWD(T, TAG, 80, 16, 128, 16, 1) MFA_FWD(T, TAG, 88, 16, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 96, 16, 128, 32, 1) MFA_FWD(T, TAG, 104, 16, 128, 8, 0)                    \
  MFA_FWD(T, TAG, 112, 16, 128, 16, 0) MFA_FWD(T, TAG, 120, 16, 128, 24, 0)                  \
  MFA_FWD(T, TAG, 128, 16, 128, 32, 0) MFA_FWD(T, TAG, 136, 16, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 144, 16, 128, 24, 0) MFA_FWD(T, TAG, 152, 16, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 160, 16, 128, 32, 0) MFA_FWD(T, TAG, 168, 16, 128, 24, 0)                  \
  MFA_FWD(T, TAG, 176, 16, 128, 16, 0) MFA_FWD(T, TAG, 184, 16, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 192, 16, 128, 32, 0) MFA_FWD(T, TAG, 200, 16, 64, 8, 0)                    \
  MFA_FWD(T, TAG, 208, 16, 64, 16, 0) MFA_FWD(T, TAG, 216, 16, 64, 24, 0)                    \
  MFA_FWD(T, TAG, 224, 16, 64, 32, 0) MFA_FWD(T, TAG, 232, 16, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 240, 16, 64, 24, 0) MFA_FWD(T, TAG, 248, 16, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 256, 16, 64, 32, 0) MFA_DQ(T, TAG, 16, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 24, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 32, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 40, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 48, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 56, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 64, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 72, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 80, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 88, 16, 64, 8, 1, 0) MFA_DQ(T, TAG, 96, 16, 64, 32, 1, 0)                   \
  MFA_DQ(T, TAG, 104, 16, 64, 8, 1, 0) MFA_DQ(T, TAG, 112, 16, 64, 16, 1, 0)                 \
  MFA_DQ(T, TAG, 120, 16, 64, 24, 1, 0) MFA_DQ(T, TAG, 128, 16, 64, 32, 1, 0)                \
  MFA_DQ(T, TAG, 136, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 144, 16, 64, 24, 0, 0)                 \
  MFA_DQ(T, TAG, 152, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 160, 16, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 168, 16, 64, 24, 0, 0) MFA_DQ(T, TAG, 176, 16, 64, 16, 0, 0)                \
  MFA_DQ(T, TAG, 184, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 192, 16, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 200, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 208, 16, 64, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 216, 16, 64, 24, 0, 0) MFA_DQ(T, TAG, 224, 16, 64, 32, 0, 0)                \
  MFA_DQ(T, TAG, 232, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 240, 16, 64, 24, 0, 0)                 \
  MFA_DQ(T, TAG, 248, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 256, 16, 64, 32, 0, 0)                 \
  MFA_DKDV(T, TAG, 16, 16, 64, 8, 1, 1) MFA_DKDV(T, TAG, 24, 16, 64, 8, 1, 1)                \
  MFA_DKDV(T, TAG, 32, 16, 64, 8, 1, 1) MFA_DKDV(T, TAG, 40, 16, 64, 8, 1, 1)                \
  MFA_DKDV(T, TAG, 48, 16, 64, 8, 1, 1) MFA_DKDV(T, TAG, 56, 16, 64, 8, 1, 1)                \
  MFA_DKDV(T, TAG, 64, 16, 32, 16, 1, 1) MFA_DKDV(T, TAG, 72, 16, 32, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 80, 16, 32, 16, 1, 1) MFA_DKDV(T, TAG, 88, 16, 32, 8, 1, 0)               \
  MFA_DKDV(T, TAG, 96, 16, 32, 16, 1, 0) MFA_DKDV(T, TAG, 104, 16, 32, 8, 1, 0)              \
  MFA_DKDV(T, TAG, 112, 16, 32, 16, 0, 0) MFA_DKDV(T, TAG, 120, 16, 32, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 128, 16, 32, 16, 0, 0) MFA_DKDV(T, TAG, 136, 16, 32, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 144, 16, 32, 16, 0, 0) MFA_DKDV(T, TAG, 152, 16, 32, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 160, 16, 32, 16, 0, 0) MFA_DKDV_SPLIT(T, TAG, 168, 16, 32, 8, 88, 0, 0)   \
  MFA_DKDV_SPLIT(T, TAG, 176, 16, 32, 8, 88, 0, 0) MFA_DKDV_SPLIT(T, TAG, 184, 16, 32, 8, 96, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 192, 16, 32, 16, 96, 0, 0) MFA_DKDV_SPLIT(T, TAG, 200, 16, 32, 8, 104, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 208, 16, 32, 8, 104, 0, 0) MFA_DKDV_SPLIT(T, TAG, 216, 16, 32, 8, 112, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 224, 16, 32, 16, 112, 0, 0) MFA_DKDV_SPLIT(T, TAG, 232, 16, 32, 8, 120, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 240, 16, 32, 24, 120, 0, 0) MFA_DKDV_SPLIT(T, TAG, 248, 16, 32, 8, 128, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 256, 16, 32, 32, 128, 0, 0)

// M1 and M2 (Apple7/Apple8).
#define MFA_APPLE7_MIXED(T, TAG) \
  MFA_FWD(T, TAG, 16, 32, 128, 16, 1) MFA_FWD(T, TAG, 24, 32, 128, 24, 1)                    \
  MFA_FWD(T, TAG, 32, 32, 128, 32, 1) MFA_FWD(T, TAG, 40, 32, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 48, 32, 128, 24, 1) MFA_FWD(T, TAG, 56, 32, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 64, 32, 128, 32, 1) MFA_FWD(T, TAG, 72, 32, 128, 24, 1)                    \
  MFA_FWD(T, TAG, 80, 32, 128, 16, 1) MFA_FWD(T, TAG, 88, 32, 128, 8, 1)                     \
  MFA_FWD(T, TAG, 96, 32, 128, 32, 1) MFA_FWD(T, TAG, 104, 32, 128, 8, 0)                    \
  MFA_FWD(T, TAG, 112, 32, 128, 16, 0) MFA_FWD(T, TAG, 120, 32, 128, 24, 0)                  \
  MFA_FWD(T, TAG, 128, 32, 128, 32, 0) MFA_FWD(T, TAG, 136, 32, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 144, 32, 128, 24, 0) MFA_FWD(T, TAG, 152, 32, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 160, 32, 128, 32, 0) MFA_FWD(T, TAG, 168, 32, 128, 24, 0)                  \
  MFA_FWD(T, TAG, 176, 32, 128, 16, 0) MFA_FWD(T, TAG, 184, 32, 128, 8, 0)                   \
  MFA_FWD(T, TAG, 192, 32, 128, 32, 0) MFA_FWD(T, TAG, 200, 32, 64, 8, 0)                    \
  MFA_FWD(T, TAG, 208, 32, 64, 16, 0) MFA_FWD(T, TAG, 216, 32, 64, 24, 0)                    \
  MFA_FWD(T, TAG, 224, 32, 64, 32, 0) MFA_FWD(T, TAG, 232, 32, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 240, 32, 64, 24, 0) MFA_FWD(T, TAG, 248, 32, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 256, 32, 64, 32, 0) MFA_DQ(T, TAG, 16, 32, 64, 16, 1, 1)                   \
  MFA_DQ(T, TAG, 24, 32, 64, 24, 1, 1) MFA_DQ(T, TAG, 32, 32, 64, 32, 1, 1)                  \
  MFA_DQ(T, TAG, 40, 32, 64, 8, 1, 1) MFA_DQ(T, TAG, 48, 32, 64, 24, 1, 1)                   \
  MFA_DQ(T, TAG, 56, 32, 64, 8, 1, 1) MFA_DQ(T, TAG, 64, 32, 64, 32, 1, 1)                   \
  MFA_DQ(T, TAG, 72, 32, 64, 24, 1, 1) MFA_DQ(T, TAG, 80, 32, 64, 16, 1, 1)                  \
  MFA_DQ(T, TAG, 88, 32, 64, 8, 1, 0) MFA_DQ(T, TAG, 96, 32, 64, 32, 1, 0)                   \
  MFA_DQ(T, TAG, 104, 32, 64, 8, 1, 0) MFA_DQ(T, TAG, 112, 32, 64, 16, 1, 0)                 \
  MFA_DQ(T, TAG, 120, 32, 64, 24, 1, 0) MFA_DQ(T, TAG, 128, 32, 64, 32, 1, 0)                \
  MFA_DQ(T, TAG, 136, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 144, 32, 64, 24, 0, 0)                 \
  MFA_DQ(T, TAG, 152, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 160, 32, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 168, 32, 64, 24, 0, 0) MFA_DQ(T, TAG, 176, 32, 64, 16, 0, 0)                \
  MFA_DQ(T, TAG, 184, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 192, 32, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 200, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 208, 32, 64, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 216, 32, 64, 24, 0, 0) MFA_DQ(T, TAG, 224, 32, 64, 32, 0, 0)                \
  MFA_DQ(T, TAG, 232, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 240, 32, 64, 24, 0, 0)                 \
  MFA_DQ(T, TAG, 248, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 256, 32, 64, 32, 0, 0)                 \
  MFA_DKDV(T, TAG, 16, 32, 64, 16, 1, 1) MFA_DKDV(T, TAG, 24, 32, 64, 24, 1, 1)              \
  MFA_DKDV(T, TAG, 32, 32, 64, 32, 1, 1) MFA_DKDV(T, TAG, 40, 32, 80, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 48, 32, 80, 24, 1, 1) MFA_DKDV(T, TAG, 56, 32, 80, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 64, 32, 64, 32, 1, 1) MFA_DKDV(T, TAG, 72, 32, 64, 24, 1, 0)              \
  MFA_DKDV(T, TAG, 80, 32, 64, 16, 1, 0) MFA_DKDV(T, TAG, 88, 32, 64, 8, 0, 0)               \
  MFA_DKDV(T, TAG, 96, 32, 64, 32, 0, 0) MFA_DKDV(T, TAG, 104, 32, 64, 8, 0, 0)              \
  MFA_DKDV(T, TAG, 112, 32, 64, 16, 0, 0) MFA_DKDV(T, TAG, 120, 32, 64, 24, 0, 0)            \
  MFA_DKDV(T, TAG, 128, 32, 64, 32, 0, 0) MFA_DKDV(T, TAG, 136, 32, 56, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 144, 32, 48, 24, 0, 0) MFA_DKDV(T, TAG, 152, 32, 40, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 160, 32, 32, 32, 0, 0) MFA_DKDV_SPLIT(T, TAG, 168, 32, 64, 8, 88, 0, 0)   \
  MFA_DKDV_SPLIT(T, TAG, 176, 32, 64, 8, 88, 0, 0) MFA_DKDV_SPLIT(T, TAG, 184, 32, 64, 8, 96, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 192, 32, 64, 32, 96, 0, 0) MFA_DKDV_SPLIT(T, TAG, 200, 32, 64, 8, 104, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 208, 32, 64, 8, 104, 0, 0) MFA_DKDV_SPLIT(T, TAG, 216, 32, 64, 8, 112, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 224, 32, 64, 16, 112, 0, 0) MFA_DKDV_SPLIT(T, TAG, 232, 32, 64, 8, 120, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 240, 32, 64, 24, 120, 0, 0) MFA_DKDV_SPLIT(T, TAG, 248, 32, 64, 8, 128, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 256, 32, 64, 32, 128, 0, 0)

#define MFA_APPLE9_f32(T, TAG) \
  MFA_FWD(T, TAG, 16, 16, 64, 16, 1) MFA_FWD(T, TAG, 24, 16, 32, 8, 1)                       \
  MFA_FWD(T, TAG, 32, 16, 32, 8, 1) MFA_FWD(T, TAG, 40, 16, 32, 8, 1)                        \
  MFA_FWD(T, TAG, 48, 16, 32, 8, 1) MFA_FWD(T, TAG, 56, 16, 64, 8, 1)                        \
  MFA_FWD(T, TAG, 64, 16, 64, 16, 1) MFA_FWD(T, TAG, 72, 16, 64, 8, 1)                       \
  MFA_FWD(T, TAG, 80, 16, 64, 16, 1) MFA_FWD(T, TAG, 88, 16, 64, 8, 1)                       \
  MFA_FWD(T, TAG, 96, 16, 64, 16, 1) MFA_FWD(T, TAG, 104, 16, 64, 8, 1)                      \
  MFA_FWD(T, TAG, 112, 16, 64, 16, 1) MFA_FWD(T, TAG, 120, 16, 64, 8, 1)                     \
  MFA_FWD(T, TAG, 128, 16, 64, 16, 1) MFA_FWD(T, TAG, 136, 16, 64, 8, 1)                     \
  MFA_FWD(T, TAG, 144, 16, 64, 16, 1) MFA_FWD(T, TAG, 152, 16, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 160, 16, 64, 16, 0) MFA_FWD(T, TAG, 168, 16, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 176, 16, 64, 16, 0) MFA_FWD(T, TAG, 184, 16, 64, 8, 0)                     \
  MFA_FWD(T, TAG, 192, 16, 64, 16, 0) MFA_FWD(T, TAG, 200, 16, 120, 8, 0)                    \
  MFA_FWD(T, TAG, 208, 16, 112, 16, 0) MFA_FWD(T, TAG, 216, 16, 112, 8, 0)                   \
  MFA_FWD(T, TAG, 224, 16, 104, 16, 0) MFA_FWD(T, TAG, 232, 16, 96, 8, 0)                    \
  MFA_FWD(T, TAG, 240, 16, 96, 16, 0) MFA_FWD(T, TAG, 248, 16, 88, 8, 0)                     \
  MFA_FWD(T, TAG, 256, 16, 80, 16, 0) MFA_DQ(T, TAG, 16, 16, 64, 8, 1, 1)                    \
  MFA_DQ(T, TAG, 24, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 32, 16, 64, 16, 1, 1)                   \
  MFA_DQ(T, TAG, 40, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 48, 16, 64, 24, 1, 1)                   \
  MFA_DQ(T, TAG, 56, 16, 64, 8, 1, 1) MFA_DQ(T, TAG, 64, 16, 64, 32, 1, 1)                   \
  MFA_DQ(T, TAG, 72, 16, 64, 24, 1, 1) MFA_DQ(T, TAG, 80, 16, 64, 16, 1, 1)                  \
  MFA_DQ(T, TAG, 88, 16, 64, 8, 1, 0) MFA_DQ(T, TAG, 96, 16, 64, 32, 1, 0)                   \
  MFA_DQ(T, TAG, 104, 16, 64, 8, 1, 0) MFA_DQ(T, TAG, 112, 16, 64, 16, 1, 0)                 \
  MFA_DQ(T, TAG, 120, 16, 64, 24, 1, 0) MFA_DQ(T, TAG, 128, 16, 64, 32, 1, 0)                \
  MFA_DQ(T, TAG, 136, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 144, 16, 64, 24, 0, 0)                 \
  MFA_DQ(T, TAG, 152, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 160, 16, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 168, 16, 64, 24, 0, 0) MFA_DQ(T, TAG, 176, 16, 64, 16, 0, 0)                \
  MFA_DQ(T, TAG, 184, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 192, 16, 64, 32, 0, 0)                 \
  MFA_DQ(T, TAG, 200, 16, 88, 8, 0, 0) MFA_DQ(T, TAG, 208, 16, 88, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 216, 16, 80, 8, 0, 0) MFA_DQ(T, TAG, 224, 16, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 232, 16, 72, 8, 0, 0) MFA_DQ(T, TAG, 240, 16, 72, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 248, 16, 64, 8, 0, 0) MFA_DQ(T, TAG, 256, 16, 64, 16, 0, 0)                 \
  MFA_DKDV(T, TAG, 16, 16, 64, 8, 1, 1) MFA_DKDV(T, TAG, 24, 16, 32, 8, 1, 1)                \
  MFA_DKDV(T, TAG, 32, 16, 32, 16, 1, 1) MFA_DKDV(T, TAG, 40, 16, 32, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 48, 16, 32, 16, 1, 1) MFA_DKDV(T, TAG, 56, 16, 32, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 64, 16, 32, 16, 1, 1) MFA_DKDV(T, TAG, 72, 16, 120, 8, 0, 0)              \
  MFA_DKDV(T, TAG, 80, 16, 112, 16, 0, 0) MFA_DKDV(T, TAG, 88, 16, 104, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 96, 16, 96, 16, 0, 0) MFA_DKDV(T, TAG, 104, 16, 88, 8, 0, 0)              \
  MFA_DKDV(T, TAG, 112, 16, 80, 16, 0, 0) MFA_DKDV(T, TAG, 120, 16, 72, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 128, 16, 64, 16, 0, 0) MFA_DKDV(T, TAG, 136, 16, 56, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 144, 16, 48, 16, 0, 0) MFA_DKDV(T, TAG, 152, 16, 40, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 160, 16, 32, 16, 0, 0) MFA_DKDV_SPLIT(T, TAG, 168, 16, 104, 8, 88, 0, 0)  \
  MFA_DKDV_SPLIT(T, TAG, 176, 16, 104, 8, 88, 0, 0) MFA_DKDV_SPLIT(T, TAG, 184, 16, 96, 8, 96, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 192, 16, 96, 16, 96, 0, 0) MFA_DKDV_SPLIT(T, TAG, 200, 16, 88, 8, 104, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 208, 16, 88, 8, 104, 0, 0) MFA_DKDV_SPLIT(T, TAG, 216, 16, 80, 8, 112, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 224, 16, 80, 16, 112, 0, 0) MFA_DKDV_SPLIT(T, TAG, 232, 16, 72, 8, 120, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 240, 16, 72, 8, 120, 0, 0) MFA_DKDV_SPLIT(T, TAG, 248, 16, 64, 8, 128, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 256, 16, 64, 16, 128, 0, 0)

#define MFA_APPLE7_f32(T, TAG) \
  MFA_FWD(T, TAG, 16, 32, 64, 16, 1) MFA_FWD(T, TAG, 24, 32, 64, 24, 1)                      \
  MFA_FWD(T, TAG, 32, 32, 64, 32, 1) MFA_FWD(T, TAG, 40, 32, 32, 40, 1)                      \
  MFA_FWD(T, TAG, 48, 32, 32, 48, 1) MFA_FWD(T, TAG, 56, 32, 32, 56, 1)                      \
  MFA_FWD(T, TAG, 64, 32, 80, 16, 1) MFA_FWD(T, TAG, 72, 32, 80, 8, 1)                       \
  MFA_FWD(T, TAG, 80, 32, 80, 16, 1) MFA_FWD(T, TAG, 88, 32, 80, 8, 1)                       \
  MFA_FWD(T, TAG, 96, 32, 80, 16, 1) MFA_FWD(T, TAG, 104, 32, 80, 8, 1)                      \
  MFA_FWD(T, TAG, 112, 32, 80, 16, 1) MFA_FWD(T, TAG, 120, 32, 80, 8, 1)                     \
  MFA_FWD(T, TAG, 128, 32, 80, 16, 1) MFA_FWD(T, TAG, 136, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 144, 32, 80, 16, 0) MFA_FWD(T, TAG, 152, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 160, 32, 80, 16, 0) MFA_FWD(T, TAG, 168, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 176, 32, 80, 16, 0) MFA_FWD(T, TAG, 184, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 192, 32, 80, 16, 0) MFA_FWD(T, TAG, 200, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 208, 32, 80, 16, 0) MFA_FWD(T, TAG, 216, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 224, 32, 80, 16, 0) MFA_FWD(T, TAG, 232, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 240, 32, 80, 16, 0) MFA_FWD(T, TAG, 248, 32, 80, 8, 0)                     \
  MFA_FWD(T, TAG, 256, 32, 80, 16, 0) MFA_DQ(T, TAG, 16, 32, 64, 16, 1, 1)                   \
  MFA_DQ(T, TAG, 24, 32, 64, 24, 1, 1) MFA_DQ(T, TAG, 32, 32, 64, 32, 1, 1)                  \
  MFA_DQ(T, TAG, 40, 32, 64, 8, 1, 1) MFA_DQ(T, TAG, 48, 32, 64, 24, 1, 1)                   \
  MFA_DQ(T, TAG, 56, 32, 64, 8, 1, 1) MFA_DQ(T, TAG, 64, 32, 80, 16, 1, 1)                   \
  MFA_DQ(T, TAG, 72, 32, 80, 8, 1, 1) MFA_DQ(T, TAG, 80, 32, 80, 16, 1, 0)                   \
  MFA_DQ(T, TAG, 88, 32, 80, 8, 1, 0) MFA_DQ(T, TAG, 96, 32, 80, 16, 1, 0)                   \
  MFA_DQ(T, TAG, 104, 32, 80, 8, 1, 0) MFA_DQ(T, TAG, 112, 32, 80, 16, 1, 0)                 \
  MFA_DQ(T, TAG, 120, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 128, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 136, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 144, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 152, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 160, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 168, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 176, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 184, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 192, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 200, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 208, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 216, 32, 80, 8, 0, 0) MFA_DQ(T, TAG, 224, 32, 80, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 232, 32, 72, 8, 0, 0) MFA_DQ(T, TAG, 240, 32, 72, 16, 0, 0)                 \
  MFA_DQ(T, TAG, 248, 32, 64, 8, 0, 0) MFA_DQ(T, TAG, 256, 32, 64, 16, 0, 0)                 \
  MFA_DKDV(T, TAG, 16, 32, 32, 16, 1, 1) MFA_DKDV(T, TAG, 24, 32, 64, 24, 1, 1)              \
  MFA_DKDV(T, TAG, 32, 32, 80, 16, 1, 1) MFA_DKDV(T, TAG, 40, 32, 80, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 48, 32, 80, 16, 1, 1) MFA_DKDV(T, TAG, 56, 32, 80, 8, 1, 1)               \
  MFA_DKDV(T, TAG, 64, 32, 64, 16, 1, 1) MFA_DKDV(T, TAG, 72, 32, 80, 8, 1, 0)               \
  MFA_DKDV(T, TAG, 80, 32, 80, 16, 0, 0) MFA_DKDV(T, TAG, 88, 32, 80, 8, 0, 0)               \
  MFA_DKDV(T, TAG, 96, 32, 80, 16, 0, 0) MFA_DKDV(T, TAG, 104, 32, 80, 8, 0, 0)              \
  MFA_DKDV(T, TAG, 112, 32, 80, 16, 0, 0) MFA_DKDV(T, TAG, 120, 32, 72, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 128, 32, 64, 16, 0, 0) MFA_DKDV(T, TAG, 136, 32, 56, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 144, 32, 48, 16, 0, 0) MFA_DKDV(T, TAG, 152, 32, 40, 8, 0, 0)             \
  MFA_DKDV(T, TAG, 160, 32, 32, 16, 0, 0) MFA_DKDV_SPLIT(T, TAG, 168, 32, 80, 8, 88, 0, 0)   \
  MFA_DKDV_SPLIT(T, TAG, 176, 32, 80, 8, 88, 0, 0) MFA_DKDV_SPLIT(T, TAG, 184, 32, 80, 8, 96, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 192, 32, 80, 16, 96, 0, 0) MFA_DKDV_SPLIT(T, TAG, 200, 32, 80, 8, 104, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 208, 32, 80, 8, 104, 0, 0) MFA_DKDV_SPLIT(T, TAG, 216, 32, 80, 8, 112, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 224, 32, 80, 16, 112, 0, 0) MFA_DKDV_SPLIT(T, TAG, 232, 32, 72, 8, 120, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 240, 32, 72, 8, 120, 0, 0) MFA_DKDV_SPLIT(T, TAG, 248, 32, 64, 8, 128, 0, 0) \
  MFA_DKDV_SPLIT(T, TAG, 256, 32, 64, 16, 128, 0, 0)

#define MFA_APPLE9_f16 MFA_APPLE9_MIXED
#define MFA_APPLE9_bf16 MFA_APPLE9_MIXED
#define MFA_APPLE7_f16 MFA_APPLE7_MIXED
#define MFA_APPLE7_bf16 MFA_APPLE7_MIXED

// The storage type of each dtype on M3 and later (Apple9): bfloat16 is
// Metal's bfloat there, so its operand matrices are bfloat (MfaOperand in
// attention_kernels.h); elsewhere, and in the decode kernels of every
// family, bfloat16 is bf16_t, widened to float.
#define MFA_APPLE9_STORAGE_f32 float
#define MFA_APPLE9_STORAGE_f16 half
#define MFA_APPLE9_STORAGE_bf16 bfloat
#if (JAX_MFA_METAL_FAMILIES & 2) && (JAX_MFA_METAL_DTYPES & 4) && !MFA_HAVE_BFLOAT
#error "the M3+ (Apple9) bfloat16 kernels use bfloat: compile them with MSL 3.1 or later"
#endif

#define MFA_FAMILIES(T, TAG) MFA_FAMILY9(T, TAG) MFA_FAMILY7(T, TAG) MFA_DECODE_KERNELS(T, TAG)
#if JAX_MFA_METAL_FAMILIES & 2
#define MFA_FAMILY9(T, TAG) MFA_APPLE9_##TAG(MFA_APPLE9_STORAGE_##TAG, TAG)
#else
#define MFA_FAMILY9(T, TAG)
#endif
#if JAX_MFA_METAL_FAMILIES & 1
#define MFA_FAMILY7(T, TAG) MFA_APPLE7_##TAG(T, TAG)
#else
#define MFA_FAMILY7(T, TAG)
#endif

// Split-key decode (attention_decode.h): one partial kernel per head bucket
// (C = 32 keys per step) and one merge kernel per storage type, for every family;
// also the dK/dV reduction of a split GQA group, one per storage type.
#define MFA_DECODE(T, TAG, HP)                                                                \
  MFA_IF_H##HP(JAX_MFA_INSTANTIATE_KERNEL("mfa_decode_" #TAG "_h" #HP "_c32",                  \
                                          attention_decode_partial, T, HP, 32))
#define MFA_DECODE_KERNELS(T, TAG) \
  MFA_DECODE(T, TAG, 16) MFA_DECODE(T, TAG, 24) MFA_DECODE(T, TAG, 32)                 \
  MFA_DECODE(T, TAG, 40) MFA_DECODE(T, TAG, 48) MFA_DECODE(T, TAG, 56)                 \
  MFA_DECODE(T, TAG, 64) MFA_DECODE(T, TAG, 72) MFA_DECODE(T, TAG, 80)                 \
  MFA_DECODE(T, TAG, 88) MFA_DECODE(T, TAG, 96) MFA_DECODE(T, TAG, 104)                \
  MFA_DECODE(T, TAG, 112) MFA_DECODE(T, TAG, 120) MFA_DECODE(T, TAG, 128)              \
  MFA_DECODE(T, TAG, 136) MFA_DECODE(T, TAG, 144) MFA_DECODE(T, TAG, 152)              \
  MFA_DECODE(T, TAG, 160) MFA_DECODE(T, TAG, 168) MFA_DECODE(T, TAG, 176)              \
  MFA_DECODE(T, TAG, 184) MFA_DECODE(T, TAG, 192) MFA_DECODE(T, TAG, 200)              \
  MFA_DECODE(T, TAG, 208) MFA_DECODE(T, TAG, 216) MFA_DECODE(T, TAG, 224)              \
  MFA_DECODE(T, TAG, 232) MFA_DECODE(T, TAG, 240) MFA_DECODE(T, TAG, 248)              \
  MFA_DECODE(T, TAG, 256)                                                              \
  JAX_MFA_INSTANTIATE_KERNEL("mfa_decode_merge_" #TAG, attention_decode_merge, T)      \
  JAX_MFA_INSTANTIATE_KERNEL("mfa_dkdv_reduce_" #TAG, attention_backward_kv_reduce, T)

#if JAX_MFA_METAL_DTYPES & 1
MFA_FAMILIES(float, f32)
#endif
#if JAX_MFA_METAL_DTYPES & 2
MFA_FAMILIES(half, f16)
#endif
#if JAX_MFA_METAL_DTYPES & 4
MFA_FAMILIES(bf16_t, bf16)
#endif
