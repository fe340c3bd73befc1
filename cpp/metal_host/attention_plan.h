// The launch plan of the Metal attention kernels, shared by both launchers
// (the Objective-C++ Metal launcher and the emulator launcher): which kernel
// (block sizes from the descriptor tables), the grid and its chunking, the
// threadgroup size and memory, the AttentionParams block and the buffer list.
//
// Launchers only move buffers and encode what a KernelLaunch says; everything
// else -- validation, zeroing the bias gradient, the row-sum reduction of a
// bias constant along keys -- happens in run_forward / run_backward here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "attention/backend.h"
#include "attention/problem.h"
#include "../../metal/attention_params.h"

namespace jax_mfa {
namespace metal_host {

// Block-size tables follow metal-flash-attention's published ones: Apple7
// covers M1/M2 (Apple7/Apple8 GPU families), Apple9 covers M3 and later.
enum class GpuFamily { Apple7, Apple9 };
enum class Pass {
  Forward, BackwardQuery, BackwardKeyValue, DecodePartial, DecodeMerge,
  BackwardKeyValueReduce,  // sums a split GQA group's partial dK/dV
};

// The largest head dim the kernels accept.
constexpr int64_t kMaxHeadDim = 256;

// Upper bound of multiply-adds one command buffer may carry; larger dispatches
// are split into chunks of whole threadgroups, each its own command buffer, so
// no single submission runs long enough to trip the macOS GPU watchdog.
// 2^36 MACs is about 50 ms on an M1 (2.6 TFLOP/s). Overridable (tests) with
// the environment variable JAX_MFA_METAL_MAX_WORK.
constexpr int64_t kMaxWorkPerCommandBuffer = int64_t(1) << 36;
int64_t max_work_per_command_buffer();

// Upper bound of the multiply-adds one threadgroup runs serially: a
// threadgroup runs on one GPU core, so chunking the grid alone does not bound
// it. 2^32 MACs is roughly 0.1 s for one threadgroup on an M1-class core
// (assuming about a 32th of the GPU's rate), far below the watchdog. Merged
// dK/dV threadgroups (bias broadcast over batch or heads) above it are split
// into slices. Overridable (tests) with JAX_MFA_METAL_MAX_GROUP_WORK.
constexpr int64_t kMaxWorkPerThreadgroup = int64_t(1) << 32;
int64_t max_work_per_threadgroup();
// Scratch for the partial dbias slots of split dK/dV threadgroups is capped
// at this many bytes (fewer slices, longer threadgroups, beyond it).
constexpr int64_t kMaxSplitScratchBytes = int64_t(1) << 30;
// Split GQA group (dK/dV): when B * K * key blocks gives fewer threadgroups
// than kKeyValueTargetGroups, or one group's heads exceed
// max_work_per_threadgroup(), the G query heads of a kv head are split over
// up to G threadgroups (group_splits), each keeping at least
// kMinGroupSplitRows query rows (heads x T) of work, the float32 partials
// within kMaxSplitScratchBytes; a reduction kernel sums them.
constexpr int64_t kKeyValueTargetGroups = 1024;
constexpr int64_t kMinGroupSplitRows = 512;

struct BlockConfig {
  int head_pad = 0;    // HP: head dim bucket the kernel is compiled for
  int rows = 0;        // P: parallelization block (rows per threadgroup)
  int cols = 0;        // C: traversal block
  int head_block = 0;  // DB: head-dim block staged through threadgroup memory
  // HO: dK/dV only, head-dim columns of dK and dV one threadgroup owns
  // (HP, or half of HP's 8-column blocks rounded up when both accumulators
  // would not fit the register budget: the grid then has ceil(HP / HO)
  // threadgroups per key block, each recomputing S^T and dP^T; the last one's
  // columns past HP read as zero). Equal to head_pad elsewhere.
  int head_out = 0;
  // Register-cache policy, per row operand: kept in registers for the whole
  // kernel (true) or reloaded through threadgroup memory, one head block at
  // a time, at every step (false). The forward and decode kernels read Q;
  // dQ reads Q and dO; dK/dV reads K and V (the other flags stay false).
  // block_config chooses them (its comment gives the rule); the kernels take
  // them as template parameters, named by kernel_name.
  bool cache_q = false, cache_dout = false, cache_k = false, cache_v = false;
  int cached_operand_count() const { return cache_q + cache_dout + cache_k + cache_v; }
};
// The cache flags of a pass's row operands, in the kernel's template order
// (forward, decode: Q; dQ: Q, dO; dK/dV: K, V; none for the other passes).
using CacheFlag = bool BlockConfig::*;
std::vector<CacheFlag> cache_flags(Pass pass);

// ---- Register model --------------------------------------------------------------
// What one thread of a kernel keeps live, in 32-bit registers, estimated from
// its structure (metal/attention_kernels.h, attention_decode.h):
//   * accumulators: O (forward, decode), dQ, or dK and dV, HO / 8 8x8 float
//     matrices each (a simdgroup_matrix<float, 8, 8> holds 2 floats per lane);
//   * cached operands: those the config's register-cache policy keeps (Q
//     in the forward and decode, Q and dO in dQ, K and V in dK/dV), HP / 8
//     matrices each, of the operand type (mfa_operand_mat in
//     attention_kernels.h): 2 registers per lane for float storage and for
//     bfloat16 widened to float (M1/M2, and the decode kernel everywhere), 1
//     for float16 and for bfloat16 in bfloat matrices (M3+ forward, dQ and
//     dK/dV): two 16-bit values in one register;
//   * score tiles: S (forward, decode), S and dP (dQ), S^T and dP^T (dK/dV),
//     C / 8 matrices each, plus the forward's per-element mask flags
//     (2 x C / 8 bools, 16 bits each);
//   * transients: the two operand matrices of one multiply-accumulate (2 x
//     the operand type's registers: 4, or 2 for 16-bit operands);
//   * scalars: kScalarRegisters for indices, spans, loop counters, the
//     running max and sum, and 3-4 device pointers of 2 registers each.
// Not counted: what the compiler may keep in fewer registers (dead ranges,
// rematerialised indices) or more (unrolled-loop temporaries). The budget is
// the 128 registers a thread can address (metal-benchmarks); above it a
// kernel spills to memory (and fewer simdgroups fit a core).
constexpr int kRegisterBudget = 128;
constexpr int kScalarRegisters = 28;
struct RegisterEstimate {
  int accumulators = 0, cached_operands = 0, score_tiles = 0, transients = 0, scalars = 0;
  int total() const { return accumulators + cached_operands + score_tiles + transients + scalars; }
};
RegisterEstimate register_estimate(Pass pass, const BlockConfig& config, DType dtype,
                                   GpuFamily family);
// Registers per lane of one operand matrix (mfa_operand_mat) of `pass`.
int operand_registers(Pass pass, DType dtype, GpuFamily family);

// The head dims the kernels are compiled for (HP): every multiple of 8 from
// 16 to 256, as MFA pads (a head dim runs in the first bucket at least as
// large, its columns past the real head dim reading as zero; 8 runs as 16).
// metal/attention.metal's JAX_MFA_METAL_HEADS bits follow this order (31
// buckets: bit 30 is the last that fits the int macro values) and
// benchmarks/model_metal.py reads this line.
constexpr int kHeadBuckets[] = {16,  24,  32,  40,  48,  56,  64,  72,  80,  88,  96,
                                104, 112, 120, 128, 136, 144, 152, 160, 168, 176, 184,
                                192, 200, 208, 216, 224, 232, 240, 248, 256};
constexpr int kHeadBucketCount = int(sizeof(kHeadBuckets) / sizeof(kHeadBuckets[0]));
// Head-dim bucket (one of kHeadBuckets); 0 if above kMaxHeadDim.
int head_bucket(int64_t head_dim);
// MFA's mixed-precision tables for float16/bfloat16 storage, its float32
// tables for float32 storage (attention_plan.cc).
BlockConfig block_config(Pass pass, GpuFamily family, DType dtype, int64_t head_dim);
// Host name of the instantiation, e.g. "mfa_fwd_f16_h64_p16_c128_d32_cache1"
// (the cache flags in the kernel's operand order: Q; Q, dO; K, V).
std::string kernel_name(Pass pass, DType dtype, const BlockConfig& config);
// Threadgroup memory the kernel declares (bytes; tiles are staged in the
// storage type); always <= 32 KiB.
size_t threadgroup_memory_bytes(Pass pass, const BlockConfig& config, DType dtype);

// Buffers a kernel binds, in [[buffer(1)]], [[buffer(2)]], ... order
// ([[buffer(0)]] is the AttentionParams block).
enum class Arg {
  Q, K, V, Bias, Mask, QLengths, KvLengths, Out, Lse, DOut, Delta, DQ, DK, DV, DBias,
  DBiasRows,  // float (B, N, T) scratch: per-row sums of dS
  // Packed sequences, sinks and dropout: bound after every other operand.
  QSegments, KvSegments, Sinks, DropoutSeed,
  // Split-key decode scratch, per (output row, key split): unnormalised O
  // (head_dim floats), running max and sum (base 2).
  DecodeO, DecodeM, DecodeL,
  // Split GQA group: float32 partial dK and dV, (B, K, group_splits, S, H).
  DKPartial, DVPartial,
};
constexpr int kArgCount = int(Arg::DVPartial) + 1;
enum class Access { Read, Write, ReadWrite };
const char* arg_name(Arg a);

struct ArgBinding {
  Arg arg;
  Access access;
  size_t bytes;   // 0 when the operand is absent (launchers bind a placeholder)
};

struct Chunk {
  int64_t group_offset = 0, groups = 0;
};

struct KernelLaunch {
  Pass pass;
  std::string kernel;
  BlockConfig config;
  int threads_per_group = 0;
  size_t threadgroup_memory = 0;
  AttentionParams params{};  // group_offset is set per chunk
  std::vector<ArgBinding> args;
  std::vector<Chunk> chunks;  // run in order; together they cover the grid
  int64_t total_groups = 0;
  int64_t work_per_group = 0;  // upper bound of one threadgroup's multiply-adds
};

// Returns an error for what the Metal kernels cannot run (float64, head dim
// above 256, sizes beyond 32-bit positions).
Status check_supported(const AttentionProblem& p, DType dtype);
KernelLaunch plan_forward(const AttentionProblem& p, DType dtype, GpuFamily family);
// [0]: the dQ kernel, [1]: the dK/dV kernel, [2] (only with group_splits > 1):
// the reduction of the partial dK/dV.
std::vector<KernelLaunch> plan_backward(const AttentionProblem& p, DType dtype, GpuFamily family);

// Split-key decode (metal/attention_decode.h): the forward of T <= kDecodeMaxQueries
// queries over at least decode_min_keys() keys runs as a partial kernel over
// key splits plus a merge kernel (the lse merge), so that a T = 1 call fills
// the GPU instead of launching B*N threadgroups. decode_min_keys() is
// kDecodeMinKeys unless JAX_MFA_METAL_DECODE_MIN_KEYS overrides it (tests).
// Never with segment ids, sinks or dropout (the regular forward handles them).
constexpr int64_t kDecodeMaxQueries = 8;
constexpr int64_t kDecodeMinKeys = 1024;
// Keys per step of the partial kernel, the fewest keys per split, and the
// threadgroups the split count aims at (~24 simdgroups on each core of a
// 40-core GPU; one simdgroup per threadgroup).
constexpr int kDecodeCols = 32;
constexpr int64_t kDecodeMinKeysPerSplit = 128;
constexpr int64_t kDecodeTargetGroups = 1024;
int64_t decode_min_keys();
bool use_decode(const AttentionProblem& p);
// [0]: the partial kernel, [1]: the merge kernel.
std::vector<KernelLaunch> plan_decode(const AttentionProblem& p, DType dtype);

// Host pointers of every Arg (nullptr when absent).
struct HostBuffers {
  const void* ptr[kArgCount] = {};
  const void* get(Arg a) const { return ptr[int(a)]; }
  void set(Arg a, const void* p) { ptr[int(a)] = p; }
};

// What a launcher implements: run every chunk of `launch` with the given host
// buffers, synchronously, returning any device or compile error as a Status.
class KernelExecutor {
 public:
  virtual ~KernelExecutor() = default;
  virtual Status run(const KernelLaunch& launch, const HostBuffers& buffers) = 0;
};

// The whole forward / backward on top of an executor (one implementation for
// the Metal and the emulated backends).
Status run_forward(const AttentionProblem& p, DType dtype, GpuFamily family,
                   const ForwardBuffers& b, KernelExecutor& exec);
Status run_backward(const AttentionProblem& p, DType dtype, GpuFamily family,
                    const BackwardBuffers& b, KernelExecutor& exec);

}  // namespace metal_host
}  // namespace jax_mfa
