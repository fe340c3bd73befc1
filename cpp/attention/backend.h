// The contract between the FFI handlers and the backends (cpu, metal,
// metal-emulated): typed-erased buffers plus the decoded AttentionProblem.
#pragma once

#include <cstdint>
#include <string>

#include "attention/problem.h"
#include "common/parallel.h"

namespace jax_mfa {

// Storage dtype of q, k, v, out and their gradients. Bias, lse and delta use
// the accumulation type: float64 for F64, float32 otherwise.
enum class DType { F32, F16, BF16, F64 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "?";
}

// Absent optional operands are nullptr (see AttentionProblem::bias/mask and
// has_*_lengths). Layouts: q/out/dq (B,T,N,H); k/v/dk/dv (B,S,K,H);
// lse/delta (B,T,N); bias/mask/dbias in their broadcast shape.
struct OperandBuffers {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* bias = nullptr;
  const bool* mask = nullptr;
  const int32_t* q_lengths = nullptr;
  const int32_t* kv_lengths = nullptr;
  const int32_t* q_segments = nullptr;   // (B, T)
  const int32_t* kv_segments = nullptr;  // (B, S)
  const void* sinks = nullptr;           // (sinks_batch, N), accumulation dtype
  const uint32_t* dropout_seed = nullptr;  // (B, 6): metal/dropout_philox.h
};

struct ForwardBuffers : OperandBuffers {
  void* out = nullptr;
  void* lse = nullptr;  // natural-log logsumexp; -inf for rows with no key
};

struct BackwardBuffers : OperandBuffers {
  const void* lse = nullptr;
  const void* dout = nullptr;
  // delta = rowsum(dout * out) - dlse, computed by the caller: the lse
  // cotangent enters the backward pass only through it.
  const void* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dbias = nullptr;  // bias's broadcast shape, reduced over broadcast dims
};

// Empty message: success.
struct Status {
  std::string message;
  bool ok() const { return message.empty(); }
  static Status Ok() { return {}; }
  static Status Error(std::string m) { return {std::move(m)}; }
};

}  // namespace jax_mfa
