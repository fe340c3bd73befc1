#include "metal_host/attention_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>

namespace jax_mfa {
namespace metal_host {

static_assert(sizeof(AttentionParams) == 8 * 9 + 4 * 43 + 4,
              "AttentionParams must keep the same layout in C++ and MSL");

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One row of a block-size table: applies to head buckets <= max_head.
struct TableRow {
  int max_head, rows, cols, head_block;
};

// metal-flash-attention's published block sizes (parallelization / traversal /
// head block), looked up by the head bucket. Rows whose head limit no bucket
// falls in (e.g. M1 dK/dV "<= 56") are kept for reference.
//
// Where MFA's row assumes an accumulator it does not keep in registers (MFA
// spills O, dQ, dK or dV to memory at large head dims; these kernels always
// keep them), the traversal block C is smaller than MFA's so that the
// register model stays within kRegisterBudget (test_register_budget in
// tests/host/host_policy_test.cc checks every instantiated row). In these
// mixed-precision rows by hand: forward above 192: C 128 -> 64 (MFA's row
// ends at 224); M3 dQ 256: 128 -> 64; M3 dK/dV 96 and 128: 128 -> 32; the
// rest by block_config's rule (M1 dK/dV 136..160: C 56..32; dK/dV from 168
// splits its head columns in two, HO).
constexpr TableRow kForwardApple9[] = {
    {32, 16, 128, 16}, {96, 16, 128, 32}, {160, 16, 128, 32}, {192, 16, 128, 32}, {384, 16, 64, 32}};
constexpr TableRow kForwardApple7[] = {{96, 32, 128, 32}, {128, 32, 128, 32}, {192, 32, 128, 32},
                                       {384, 32, 64, 32}};
constexpr TableRow kQueryApple9[] = {{80, 16, 64, 8}, {192, 16, 64, 32}, {384, 16, 64, 32}};
constexpr TableRow kQueryApple7[] = {{32, 32, 64, 32}, {96, 32, 64, 32}, {384, 32, 64, 32}};
constexpr TableRow kKeyValueApple9[] = {
    {56, 16, 64, 8}, {80, 16, 32, 16}, {144, 16, 32, 16}, {224, 16, 32, 16}, {384, 16, 32, 32}};
constexpr TableRow kKeyValueApple7[] = {
    {16, 32, 64, 16}, {32, 32, 64, 32}, {56, 32, 80, 32}, {96, 32, 64, 32}, {384, 32, 64, 32}};

// MFA's separate tables for float32 (operands and registers in float32),
// used for float32 storage. Where a row of either set leaves the register
// budget, block_config lowers C and then splits dK/dV's head columns, by rule.
constexpr TableRow kForwardApple9F32[] = {
    {8, 16, 128, 16}, {16, 16, 64, 16}, {48, 16, 32, 8}, {192, 16, 64, 16}, {384, 16, 128, 16}};
constexpr TableRow kForwardApple7F32[] = {
    {24, 32, 64, 24}, {32, 32, 64, 32}, {56, 32, 32, 56}, {384, 32, 80, 16}};
constexpr TableRow kQueryApple9F32[] = {
    {16, 16, 64, 8}, {32, 16, 64, 16}, {192, 16, 64, 32}, {384, 16, 128, 16}};
constexpr TableRow kQueryApple7F32[] = {
    {16, 32, 64, 16}, {32, 32, 64, 32}, {56, 32, 64, 24}, {384, 32, 80, 16}};
constexpr TableRow kKeyValueApple9F32[] = {{16, 16, 64, 8},   {32, 16, 32, 16},
                                           {64, 16, 32, 16},  {128, 16, 128, 16},
                                           {160, 16, 128, 16}, {384, 16, 128, 16}};
constexpr TableRow kKeyValueApple7F32[] = {
    {16, 32, 32, 16}, {24, 32, 64, 24}, {56, 32, 80, 16}, {384, 32, 80, 16}};

// Every table row fits Metal's 32 KiB of threadgroup memory (the dK/dV kernel
// adds lse and delta for C queries) and tiles the head dim by whole 8x8 blocks.
template <size_t N>
constexpr bool fits(const TableRow (&table)[N]) {
  for (const TableRow& r : table) {
    if (4 * r.cols * r.head_block + 8 * r.cols > 32768) return false;
    if (r.rows % 8 != 0 || r.cols % 8 != 0 || r.head_block % 8 != 0) return false;
  }
  return true;
}
static_assert(fits(kForwardApple9) && fits(kForwardApple7) && fits(kQueryApple9) &&
                  fits(kQueryApple7) && fits(kKeyValueApple9) && fits(kKeyValueApple7) &&
                  fits(kForwardApple9F32) && fits(kForwardApple7F32) && fits(kQueryApple9F32) &&
                  fits(kQueryApple7F32) && fits(kKeyValueApple9F32) && fits(kKeyValueApple7F32),
              "a block-size table row exceeds threadgroup memory or breaks 8x8 tiling");

// The head block of a table row for `head_cols` head columns: the table's,
// or the largest multiple of 8 below it that divides head_cols (a bucket
// like 72 or 80 is then staged in whole blocks: 3 x 24, 5 x 16).
int head_block_for(int table_head_block, int head_cols) {
  int db = std::min(table_head_block, head_cols) / 8 * 8;
  while (head_cols % db != 0) db -= 8;
  return db;
}

template <size_t N>
BlockConfig lookup(const TableRow (&table)[N], int head_pad) {
  for (const TableRow& r : table) {
    if (head_pad <= r.max_head)
      return {head_pad, r.rows, r.cols, head_block_for(r.head_block, head_pad), head_pad};
  }
  return {};
}

const char* dtype_tag(DType d) {
  switch (d) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::F64: return "f64";
  }
  return "?";
}

size_t storage_bytes(DType d) { return d == DType::F32 ? 4 : 2; }

AttentionParams make_params(const AttentionProblem& p) {
  AttentionParams a{};
  for (int d = 0; d < 4; ++d) {
    a.bias_strides[d] = p.bias.present ? p.bias.strides[d] : 0;
    a.mask_strides[d] = p.mask.present ? p.mask.strides[d] : 0;
  }
  a.batch = int32_t(p.batch);
  a.q_len = int32_t(p.q_len);
  a.kv_len = int32_t(p.kv_len);
  a.q_heads = int32_t(p.q_heads);
  a.kv_heads = int32_t(p.kv_heads);
  a.head_dim = int32_t(p.head_dim);
  a.group_size = int32_t(p.group_size());
  const double log2e = 1.4426950408889634;
  a.scale = float(p.scale);
  a.scale_log2 = float(p.scale * log2e);
  a.has_softcap = p.softcap > 0;
  a.softcap = a.has_softcap ? float(p.softcap) : 1.0f;
  a.softcap_log2 = float(a.softcap * log2e);
  a.causal = p.causal;
  // A window wider than any sequence is the same as no bound (keeps int32).
  const int64_t big = std::max<int64_t>(p.q_len, p.kv_len) + 1;
  a.window_left = p.window_left < 0 ? -1 : int32_t(std::min(p.window_left, big));
  a.window_right = p.window_right < 0 ? -1 : int32_t(std::min(p.window_right, big));
  a.has_q_lengths = p.has_q_lengths;
  a.has_kv_lengths = p.has_kv_lengths;
  a.has_bias = p.bias.present;
  a.has_mask = p.mask.present;
  a.dbias_mode = MFA_DBIAS_NONE;
  a.bias_batch_dim = int32_t(p.bias.dims[0]);
  a.bias_head_dim = int32_t(p.bias.dims[1]);
  a.bias_query_broadcast = p.bias.present && p.bias.strides[2] == 0;
  a.kv_splits = 1;
  a.pairs_per_split = 1;
  a.has_segment_ids = p.has_segment_ids;
  a.segments_sorted = 0;  // set by run_forward / run_backward, which see the ids
  a.has_sinks = p.has_sinks;
  a.sinks_batched = p.has_sinks && p.sinks_batch != 1;
  a.has_dropout = p.has_dropout();
  a.dropout_broadcast_heads = p.dropout_broadcast_heads;
  a.dropout_threshold = p.dropout_threshold;
  a.dropout_keep_scale = float(p.dropout_keep_scale());
  a.decode_splits = 1;
  a.group_splits = 1;
  a.heads_per_group_split = int32_t(p.group_size());
  a.decode_keys_per_split = int32_t(p.kv_len);
  return a;
}

// The operands of the newer features, appended to every kernel's buffer list.
std::vector<ArgBinding> feature_args(const AttentionProblem& p) {
  const bool seg = p.has_segment_ids;
  return {{Arg::QSegments, Access::Read, seg ? size_t(p.batch * p.q_len) * 4 : 0},
          {Arg::KvSegments, Access::Read, seg ? size_t(p.batch * p.kv_len) * 4 : 0},
          {Arg::Sinks, Access::Read, p.has_sinks ? size_t(p.sinks_batch * p.q_heads) * 4 : 0},
          {Arg::DropoutSeed, Access::Read,
           p.has_dropout() ? size_t(p.batch) * MFA_DROPOUT_SEED_WORDS * 4 : 0}};
}

void append(std::vector<ArgBinding>& args, const std::vector<ArgBinding>& more) {
  args.insert(args.end(), more.begin(), more.end());
}

// Whether every row of the segment ids is non-decreasing (packed sequences):
// the kernels may then skip tiles by their first and last ids.
bool segments_sorted(const AttentionProblem& p, const OperandBuffers& b) {
  if (!p.has_segment_ids) return false;
  for (auto [ids, len] : {std::pair{b.q_segments, p.q_len}, std::pair{b.kv_segments, p.kv_len}})
    for (int64_t r = 0; r < p.batch; ++r)
      if (!std::is_sorted(ids + r * len, ids + (r + 1) * len)) return false;
  return true;
}

// Splits the launch's total_groups threadgroups of `work_per_group`
// multiply-adds each into chunks of at most max_work_per_command_buffer() work.
void set_chunks(KernelLaunch& l, int64_t work_per_group) {
  l.work_per_group = work_per_group;
  const int64_t per = std::max<int64_t>(1, max_work_per_command_buffer() /
                                               std::max<int64_t>(1, work_per_group));
  for (int64_t g = 0; g < l.total_groups; g += per)
    l.chunks.push_back({g, std::min(per, l.total_groups - g)});
}

KernelLaunch base_launch(Pass pass, const AttentionProblem& p, DType dtype, GpuFamily family) {
  KernelLaunch l;
  l.pass = pass;
  l.config = block_config(pass, family, dtype, p.head_dim);
  l.kernel = kernel_name(pass, dtype, l.config);
  l.threads_per_group = 32 * l.config.rows / 8;
  l.threadgroup_memory = threadgroup_memory_bytes(pass, l.config, dtype);
  l.params = make_params(p);
  l.params.block_rows = l.config.rows;
  return l;
}

int64_t positive_env(const char* name, int64_t fallback) {
  if (const char* s = std::getenv(name)) {
    const long long v = std::atoll(s);
    if (v > 0) return v;
  }
  return fallback;
}

}  // namespace

int64_t max_work_per_command_buffer() {
  return positive_env("JAX_MFA_METAL_MAX_WORK", kMaxWorkPerCommandBuffer);
}

int64_t max_work_per_threadgroup() {
  return positive_env("JAX_MFA_METAL_MAX_GROUP_WORK", kMaxWorkPerThreadgroup);
}

int head_bucket(int64_t head_dim) {
  for (int b : kHeadBuckets)
    if (head_dim <= b) return b;
  return 0;
}

BlockConfig block_config(Pass pass, GpuFamily family, DType dtype, int64_t head_dim) {
  const int hp = head_bucket(head_dim);
  if (hp == 0) return {};
  const bool m3 = family == GpuFamily::Apple9, f32 = dtype == DType::F32;
  BlockConfig c;
  switch (pass) {
    case Pass::Forward:
      c = f32 ? (m3 ? lookup(kForwardApple9F32, hp) : lookup(kForwardApple7F32, hp))
              : (m3 ? lookup(kForwardApple9, hp) : lookup(kForwardApple7, hp));
      break;
    case Pass::BackwardQuery:
      c = f32 ? (m3 ? lookup(kQueryApple9F32, hp) : lookup(kQueryApple7F32, hp))
              : (m3 ? lookup(kQueryApple9, hp) : lookup(kQueryApple7, hp));
      break;
    case Pass::BackwardKeyValue:
      c = f32 ? (m3 ? lookup(kKeyValueApple9F32, hp) : lookup(kKeyValueApple7F32, hp))
              : (m3 ? lookup(kKeyValueApple9, hp) : lookup(kKeyValueApple7, hp));
      break;
    case Pass::DecodePartial:
    case Pass::DecodeMerge:
      c = {hp, 8, kDecodeCols, 0, hp};
      c.cache_q = pass == Pass::DecodePartial && mfa_decode_caches_q(hp);
      return c;
    case Pass::BackwardKeyValueReduce: return {hp, 0, 0, 0, hp};
  }
  // Register-cache policy, one rule for every family, storage type and head
  // bucket: (1) MFA's defaults (attention_params.h: forward Q up to bucket
  // 96, dQ's Q and dO and dK/dV's K and V up to 64) are cached, and the
  // accumulators are fitted below with them in registers; (2) then each
  // other row operand, in the kernel's order (Q then dO, K then V), is
  // cached too when the register model with it cached stays within
  // kRegisterBudget. A cached operand saves its threadgroup staging and
  // barriers at every step; (1) prefers MFA's choice over a larger C.
  const bool defaults =
      pass == Pass::Forward ? mfa_forward_caches_q(hp) : mfa_backward_caches_rows(hp);
  for (CacheFlag flag : cache_flags(pass)) c.*flag = defaults;
  // Over the register budget (MFA spills an accumulator there; these kernels
  // keep them all): first fewer columns per step, 8 at a time down to 32.
  const BlockConfig table = c;
  // The float estimate decides for every storage type (16-bit operands only
  // need fewer registers), so float16 and bfloat16 share one configuration.
  auto over = [&] { return register_estimate(pass, c, DType::F32, family).total() > kRegisterBudget; };
  while (over() && c.cols > 32) c.cols -= 8;
  if (over() && pass == Pass::BackwardKeyValue) {
    // dK's and dV's accumulators take 4 x HO / 8 registers: each threadgroup
    // owns half the head's 8-column blocks of dK and dV (rounded up: 136 =
    // 72 + 64), at the table's C if that fits now. The head block tiles both
    // S^T's HP and the accumulators' HO columns.
    c = table;
    c.head_out = (hp / 8 + 1) / 2 * 8;
    c.head_block = head_block_for(c.head_block, std::gcd(hp, c.head_out));
    while (over() && c.cols > 32) c.cols -= 8;
  }
  for (CacheFlag flag : cache_flags(pass)) {
    if (c.*flag) continue;
    c.*flag = true;
    if (over()) c.*flag = false;
  }
  return c;
}

int operand_registers(Pass pass, DType dtype, GpuFamily family) {
  // half for float16; bfloat for bfloat16 where the kernel stores it as
  // bfloat (attention.metal's MFA_APPLE9_STORAGE: M3+, not the decode
  // kernel); float otherwise.
  const bool bfloat_matrices = dtype == DType::BF16 && family == GpuFamily::Apple9 &&
                               pass != Pass::DecodePartial;
  return dtype == DType::F16 || bfloat_matrices ? 1 : 2;
}

std::vector<CacheFlag> cache_flags(Pass pass) {
  switch (pass) {
    case Pass::Forward:
    case Pass::DecodePartial: return {&BlockConfig::cache_q};
    case Pass::BackwardQuery: return {&BlockConfig::cache_q, &BlockConfig::cache_dout};
    case Pass::BackwardKeyValue: return {&BlockConfig::cache_k, &BlockConfig::cache_v};
    case Pass::DecodeMerge:
    case Pass::BackwardKeyValueReduce: return {};
  }
  return {};
}

RegisterEstimate register_estimate(Pass pass, const BlockConfig& c, DType dtype, GpuFamily family) {
  RegisterEstimate r;
  const int hb = c.head_pad / 8, ob = c.head_out / 8, cb = c.cols / 8;
  const int operand = operand_registers(pass, dtype, family);
  r.transients = 2 * operand;
  r.scalars = kScalarRegisters;
  r.cached_operands = c.cached_operand_count() * operand * hb;
  switch (pass) {
    case Pass::Forward:
    case Pass::DecodePartial:
      r.accumulators = 2 * ob;
      r.score_tiles = 2 * cb + cb;  // S, and 2 x C / 8 16-bit mask flags
      break;
    case Pass::BackwardQuery:
      r.accumulators = 2 * ob;
      r.score_tiles = 4 * cb;
      break;
    case Pass::BackwardKeyValue:
      r.accumulators = 4 * ob;
      r.score_tiles = 4 * cb;
      break;
    case Pass::DecodeMerge:
    case Pass::BackwardKeyValueReduce:
      r.transients = 0;
      break;
  }
  return r;
}

std::string kernel_name(Pass pass, DType dtype, const BlockConfig& c) {
  if (pass == Pass::DecodePartial)
    return std::string("mfa_decode_") + dtype_tag(dtype) + "_h" + std::to_string(c.head_pad) +
           "_c" + std::to_string(c.cols);
  if (pass == Pass::DecodeMerge) return std::string("mfa_decode_merge_") + dtype_tag(dtype);
  if (pass == Pass::BackwardKeyValueReduce)
    return std::string("mfa_dkdv_reduce_") + dtype_tag(dtype);
  const char* kind = pass == Pass::Forward ? "fwd" : pass == Pass::BackwardQuery ? "dq" : "dkdv";
  std::string flags;
  for (CacheFlag flag : cache_flags(pass)) flags += c.*flag ? '1' : '0';
  return std::string("mfa_") + kind + "_" + dtype_tag(dtype) + "_h" + std::to_string(c.head_pad) +
         "_p" + std::to_string(c.rows) + "_c" + std::to_string(c.cols) + "_d" +
         std::to_string(c.head_block) +
         (c.head_out < c.head_pad ? "_o" + std::to_string(c.head_out) : "") + "_cache" + flags;
}

size_t threadgroup_memory_bytes(Pass pass, const BlockConfig& c, DType dtype) {
  if (pass == Pass::DecodePartial || pass == Pass::BackwardKeyValueReduce) return 0;
  if (pass == Pass::DecodeMerge) return sizeof(float) * MFA_MAX_DECODE_SPLITS;
  size_t bytes = storage_bytes(dtype) * size_t(c.cols) * size_t(c.head_block);
  if (pass == Pass::BackwardKeyValue) bytes += 2 * sizeof(float) * size_t(c.cols);  // lse, delta
  return bytes;
}

const char* arg_name(Arg a) {
  static const char* names[] = {"q",   "k",  "v",     "bias", "mask", "q_lengths",
                                "kv_lengths", "out", "lse", "dout", "delta", "dq",
                                "dk",  "dv", "dbias", "dbias_rows", "q_segments",
                                "kv_segments", "sinks", "dropout_seed", "decode_o",
                                "decode_m", "decode_l", "dk_partial",
                                "dv_partial"};
  return names[int(a)];
}

Status check_supported(const AttentionProblem& p, DType dtype) {
  if (dtype == DType::F64)
    return Status::Error("the Metal kernels support float32, float16 and bfloat16, not float64");
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim)
    return Status::Error("the Metal kernels support head dims 1.." + std::to_string(kMaxHeadDim) +
                         ", got " + std::to_string(p.head_dim));
  const int64_t lim = std::numeric_limits<int32_t>::max() / 2;
  if (p.batch > lim || p.q_len > lim || p.kv_len > lim || p.q_heads > lim ||
      p.batch * p.q_heads * ceil_div(p.q_len, 16) > lim ||
      p.batch * p.kv_heads * ceil_div(p.kv_len, 16) > lim)
    return Status::Error("problem too large for the Metal kernels' 32-bit grid");
  return Status::Ok();
}

KernelLaunch plan_forward(const AttentionProblem& p, DType dtype, GpuFamily family) {
  KernelLaunch l = base_launch(Pass::Forward, p, dtype, family);
  const size_t st = storage_bytes(dtype);
  const size_t q_bytes = size_t(p.batch * p.q_len * p.q_heads * p.head_dim) * st;
  const size_t kv_bytes = size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st;
  l.params.num_row_blocks = int32_t(ceil_div(p.q_len, l.config.rows));
  l.args = {{Arg::Q, Access::Read, q_bytes},
            {Arg::K, Access::Read, kv_bytes},
            {Arg::V, Access::Read, kv_bytes},
            {Arg::Bias, Access::Read, p.bias.present ? size_t(p.bias.size()) * 4 : 0},
            {Arg::Mask, Access::Read, p.mask.present ? size_t(p.mask.size()) : 0},
            {Arg::QLengths, Access::Read, p.has_q_lengths ? size_t(p.batch) * 4 : 0},
            {Arg::KvLengths, Access::Read, p.has_kv_lengths ? size_t(p.batch) * 4 : 0},
            {Arg::Out, Access::Write, q_bytes},
            {Arg::Lse, Access::Write, size_t(p.batch * p.q_len * p.q_heads) * 4}};
  append(l.args, feature_args(p));
  l.total_groups = int64_t(l.params.num_row_blocks) * p.q_heads * p.batch;
  l.params.total_groups = int32_t(l.total_groups);
  // Q K^T and P V: 2 * rows * S * HP multiply-adds per threadgroup at most.
  set_chunks(l, 2 * int64_t(l.config.rows) * std::max<int64_t>(p.kv_len, 1) * l.config.head_pad);
  return l;
}

std::vector<KernelLaunch> plan_backward(const AttentionProblem& p, DType dtype,
                                        GpuFamily family) {
  const size_t st = storage_bytes(dtype);
  const size_t q_bytes = size_t(p.batch * p.q_len * p.q_heads * p.head_dim) * st;
  const size_t kv_bytes = size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st;
  const size_t row_bytes = size_t(p.batch * p.q_len * p.q_heads) * 4;
  // Bias gradient ownership, as in the CPU design: varying along keys -> the
  // dK/dV kernel; constant along keys -> row sums from the dQ kernel.
  const bool bias = p.bias.present;
  const bool dbias_keys = bias && p.bias.dims[3] == p.kv_len;
  const int32_t mode = !bias ? MFA_DBIAS_NONE : dbias_keys ? MFA_DBIAS_KEYS : MFA_DBIAS_ROW_SUMS;

  const std::vector<ArgBinding> common = {
      {Arg::Q, Access::Read, q_bytes},
      {Arg::K, Access::Read, kv_bytes},
      {Arg::V, Access::Read, kv_bytes},
      {Arg::Bias, Access::Read, bias ? size_t(p.bias.size()) * 4 : 0},
      {Arg::Mask, Access::Read, p.mask.present ? size_t(p.mask.size()) : 0},
      {Arg::QLengths, Access::Read, p.has_q_lengths ? size_t(p.batch) * 4 : 0},
      {Arg::KvLengths, Access::Read, p.has_kv_lengths ? size_t(p.batch) * 4 : 0},
      {Arg::Lse, Access::Read, row_bytes},
      {Arg::DOut, Access::Read, q_bytes},
      {Arg::Delta, Access::Read, row_bytes}};

  KernelLaunch dq = base_launch(Pass::BackwardQuery, p, dtype, family);
  dq.params.dbias_mode = mode;
  dq.params.num_row_blocks = int32_t(ceil_div(p.q_len, dq.config.rows));
  dq.args = common;
  dq.args.push_back({Arg::DQ, Access::Write, q_bytes});
  dq.args.push_back({Arg::DBiasRows, Access::Write, mode == MFA_DBIAS_ROW_SUMS ? row_bytes : 0});
  append(dq.args, feature_args(p));
  dq.total_groups = int64_t(dq.params.num_row_blocks) * p.q_heads * p.batch;
  dq.params.total_groups = int32_t(dq.total_groups);
  // Q K^T, dO V^T, dS K.
  set_chunks(dq, 3 * int64_t(dq.config.rows) * std::max<int64_t>(p.kv_len, 1) *
                     dq.config.head_pad);

  KernelLaunch kv = base_launch(Pass::BackwardKeyValue, p, dtype, family);
  kv.params.dbias_mode = mode;
  kv.params.num_row_blocks = int32_t(ceil_div(p.kv_len, kv.config.rows));
  kv.params.merge_batches = dbias_keys && p.bias.dims[0] == 1;
  kv.params.merge_heads = dbias_keys && p.bias.dims[1] == 1;
  kv.args = common;
  kv.args.push_back({Arg::DK, Access::Write, kv_bytes});
  kv.args.push_back({Arg::DV, Access::Write, kv_bytes});
  const int64_t b_tasks = kv.params.merge_batches ? 1 : p.batch;
  const int64_t h_tasks = kv.params.merge_heads ? 1 : p.kv_heads;
  // K Q^T, V dO^T (HP wide), P^T dO, dS^T Q (HO wide) over every query of
  // the G query heads of one (batch, kv head) pair.
  const int64_t pair_work = 2 * int64_t(kv.config.rows) * std::max<int64_t>(p.q_len, 1) *
                            p.group_size() * (kv.config.head_pad + kv.config.head_out);
  // A merged threadgroup loops over `pairs` pairs; split them into slices
  // within the per-threadgroup bound (and the scratch budget).
  const int64_t pairs = (p.batch / b_tasks) * (p.kv_heads / h_tasks);
  int64_t splits = 1;
  if (pairs > 1) {
    const int64_t slot_bytes = std::max<int64_t>(1, p.bias.size() * 4);
    splits = std::min({pairs, ceil_div(pairs * pair_work, max_work_per_threadgroup()),
                       std::max<int64_t>(1, kMaxSplitScratchBytes / slot_bytes)});
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t pairs_per_split = ceil_div(pairs, splits);
  splits = ceil_div(pairs, pairs_per_split);  // no empty slice
  kv.params.kv_splits = int32_t(splits);
  kv.params.pairs_per_split = int32_t(pairs_per_split);
  kv.params.dbias_slot = splits > 1 ? p.bias.size() : 0;
  kv.args.push_back({Arg::DBias, Access::ReadWrite,
                     dbias_keys ? size_t(splits * p.bias.size()) * 4 : 0});
  append(kv.args, feature_args(p));
  const int64_t head_parts = ceil_div(kv.config.head_pad, kv.config.head_out);

  // Split GQA group (kKeyValueTargetGroups): not where a bias broadcast
  // merges pairs (its dbias elements are shared by the group's heads), so
  // each dbias element keeps one writer.
  const int64_t G = p.group_size();
  const int64_t partial_elems = p.batch * p.kv_heads * p.kv_len * p.head_dim;  // per split
  int64_t group_splits = 1;
  if (!kv.params.merge_batches && !kv.params.merge_heads && G > 1) {
    const int64_t base_groups = int64_t(kv.params.num_row_blocks) * head_parts * b_tasks * h_tasks;
    const int64_t for_bound = ceil_div(pair_work, max_work_per_threadgroup());
    const int64_t for_fill = std::min(ceil_div(kKeyValueTargetGroups, base_groups),
                                      p.q_len * G / kMinGroupSplitRows);
    const int64_t for_scratch = kMaxSplitScratchBytes / (2 * 4 * partial_elems);
    const int64_t for_grid = (std::numeric_limits<int32_t>::max() / 2) / base_groups;  // int32 ids
    group_splits = std::min({std::max(for_bound, for_fill), G, for_scratch, for_grid});
    group_splits = std::max<int64_t>(group_splits, 1);
  }
  const int64_t heads_per_split = ceil_div(G, group_splits);
  group_splits = ceil_div(G, heads_per_split);  // no empty slice
  kv.params.group_splits = int32_t(group_splits);
  kv.params.heads_per_group_split = int32_t(heads_per_split);
  const size_t partial_bytes = group_splits > 1 ? size_t(group_splits * partial_elems) * 4 : 0;
  kv.args.push_back({Arg::DKPartial, Access::Write, partial_bytes});
  kv.args.push_back({Arg::DVPartial, Access::Write, partial_bytes});
  kv.total_groups = int64_t(kv.params.num_row_blocks) * head_parts * group_splits * splits *
                    h_tasks * b_tasks;
  kv.params.total_groups = int32_t(kv.total_groups);
  set_chunks(kv, pair_work / G * heads_per_split * pairs_per_split);
  if (group_splits == 1) return {dq, kv};

  KernelLaunch reduce;
  reduce.pass = Pass::BackwardKeyValueReduce;
  reduce.config = block_config(reduce.pass, family, dtype, p.head_dim);
  reduce.kernel = kernel_name(reduce.pass, dtype, reduce.config);
  reduce.threads_per_group = MFA_REDUCE_THREADS;
  reduce.params = kv.params;
  reduce.args = {{Arg::DKPartial, Access::Read, partial_bytes},
                 {Arg::DVPartial, Access::Read, partial_bytes},
                 {Arg::DK, Access::Write, kv_bytes},
                 {Arg::DV, Access::Write, kv_bytes}};
  reduce.total_groups = ceil_div(partial_elems, MFA_REDUCE_THREADS);
  reduce.params.total_groups = int32_t(reduce.total_groups);
  set_chunks(reduce, 2 * int64_t(MFA_REDUCE_THREADS) * group_splits);
  return {dq, kv, reduce};
}

int64_t decode_min_keys() {
  return positive_env("JAX_MFA_METAL_DECODE_MIN_KEYS", kDecodeMinKeys);
}

bool use_decode(const AttentionProblem& p) {
  // The decode kernels have no segment ids, sinks or dropout: those calls
  // take the regular forward kernel.
  return p.q_len <= kDecodeMaxQueries && p.kv_len >= decode_min_keys() && !p.has_segment_ids &&
         !p.has_sinks && !p.has_dropout();
}

std::vector<KernelLaunch> plan_decode(const AttentionProblem& p, DType dtype) {
  const size_t st = storage_bytes(dtype);
  const int64_t rows = p.batch * p.q_len * p.q_heads;
  const int64_t row_tiles = ceil_div(p.q_len * p.group_size(), 8);
  // Enough splits to fill the GPU, each at least kDecodeMinKeysPerSplit keys
  // and a whole number of steps; never more than the merge kernel holds.
  const int64_t groups_per_split = p.batch * p.kv_heads * row_tiles;
  int64_t splits = std::min(ceil_div(kDecodeTargetGroups, groups_per_split),
                            ceil_div(p.kv_len, kDecodeMinKeysPerSplit));
  splits = std::clamp<int64_t>(splits, 1, MFA_MAX_DECODE_SPLITS);
  const int64_t keys_per_split = ceil_div(ceil_div(p.kv_len, splits), kDecodeCols) * kDecodeCols;
  splits = ceil_div(p.kv_len, keys_per_split);  // no empty split
  const size_t slots = size_t(rows * splits);

  KernelLaunch part;
  part.pass = Pass::DecodePartial;
  // The decode kernels are the same for every family.
  part.config = block_config(part.pass, GpuFamily::Apple9, dtype, p.head_dim);
  part.kernel = kernel_name(part.pass, dtype, part.config);
  part.threads_per_group = 32;
  part.threadgroup_memory = threadgroup_memory_bytes(part.pass, part.config, dtype);
  part.params = make_params(p);
  part.params.num_row_blocks = int32_t(row_tiles);
  part.params.decode_splits = int32_t(splits);
  part.params.decode_keys_per_split = int32_t(keys_per_split);
  part.args = {{Arg::Q, Access::Read, size_t(rows * p.head_dim) * st},
               {Arg::K, Access::Read, size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st},
               {Arg::V, Access::Read, size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st},
               {Arg::Bias, Access::Read, p.bias.present ? size_t(p.bias.size()) * 4 : 0},
               {Arg::Mask, Access::Read, p.mask.present ? size_t(p.mask.size()) : 0},
               {Arg::QLengths, Access::Read, p.has_q_lengths ? size_t(p.batch) * 4 : 0},
               {Arg::KvLengths, Access::Read, p.has_kv_lengths ? size_t(p.batch) * 4 : 0},
               {Arg::DecodeO, Access::Write, slots * size_t(p.head_dim) * 4},
               {Arg::DecodeM, Access::Write, slots * 4},
               {Arg::DecodeL, Access::Write, slots * 4}};
  part.total_groups = groups_per_split * splits;
  part.params.total_groups = int32_t(part.total_groups);
  // Q K^T and P V over one split for 8 rows.
  set_chunks(part, 2 * 8 * keys_per_split * part.config.head_pad);

  KernelLaunch merge;
  merge.pass = Pass::DecodeMerge;
  merge.config = part.config;
  merge.kernel = kernel_name(merge.pass, dtype, merge.config);
  merge.threads_per_group = 32;
  merge.threadgroup_memory = threadgroup_memory_bytes(merge.pass, merge.config, dtype);
  merge.params = part.params;
  merge.args = {{Arg::DecodeO, Access::Read, slots * size_t(p.head_dim) * 4},
                {Arg::DecodeM, Access::Read, slots * 4},
                {Arg::DecodeL, Access::Read, slots * 4},
                {Arg::Out, Access::Write, size_t(rows * p.head_dim) * st},
                {Arg::Lse, Access::Write, size_t(rows) * 4}};
  merge.total_groups = rows;
  merge.params.total_groups = int32_t(rows);
  set_chunks(merge, splits * p.head_dim);
  return {part, merge};
}

namespace {

// The operands both passes read.
void set_operands(const OperandBuffers& b, HostBuffers& hb) {
  hb.set(Arg::Q, b.q);
  hb.set(Arg::K, b.k);
  hb.set(Arg::V, b.v);
  hb.set(Arg::Bias, b.bias);
  hb.set(Arg::Mask, b.mask);
  hb.set(Arg::QLengths, b.q_lengths);
  hb.set(Arg::KvLengths, b.kv_lengths);
  hb.set(Arg::QSegments, b.q_segments);
  hb.set(Arg::KvSegments, b.kv_segments);
  hb.set(Arg::Sinks, b.sinks);
  hb.set(Arg::DropoutSeed, b.dropout_seed);
}

}  // namespace

Status run_forward(const AttentionProblem& p, DType dtype, GpuFamily family,
                   const ForwardBuffers& b, KernelExecutor& exec) {
  if (Status s = check_supported(p, dtype); !s.ok()) return s;
  if (p.batch == 0 || p.q_len == 0 || p.q_heads == 0) return Status::Ok();
  if (p.kv_len == 0) {
    // No keys at all: every row is empty (its lse is the sink, if any).
    const size_t st = storage_bytes(dtype);
    std::memset(b.out, 0, size_t(p.batch * p.q_len * p.q_heads * p.head_dim) * st);
    float* lse = static_cast<float*>(b.lse);
    const float* sinks = static_cast<const float*>(b.sinks);
    for (int64_t bb = 0; bb < p.batch; ++bb)
      for (int64_t i = 0; i < p.q_len; ++i)
        for (int64_t n = 0; n < p.q_heads; ++n)
          lse[(bb * p.q_len + i) * p.q_heads + n] =
              p.has_sinks ? p.sink(sinks, bb, n) : -std::numeric_limits<float>::infinity();
    return Status::Ok();
  }
  HostBuffers hb;
  set_operands(b, hb);
  hb.set(Arg::Out, b.out);
  hb.set(Arg::Lse, b.lse);
  if (!use_decode(p)) {
    KernelLaunch launch = plan_forward(p, dtype, family);
    launch.params.segments_sorted = segments_sorted(p, b);
    return exec.run(launch, hb);
  }
  const std::vector<KernelLaunch> plan = plan_decode(p, dtype);
  const KernelLaunch& part = plan[0];
  const size_t slots = size_t(p.batch * p.q_len * p.q_heads) * size_t(part.params.decode_splits);
  std::vector<float> partial_o(slots * size_t(p.head_dim)), partial_m(slots), partial_l(slots);
  hb.set(Arg::DecodeO, partial_o.data());
  hb.set(Arg::DecodeM, partial_m.data());
  hb.set(Arg::DecodeL, partial_l.data());
  for (const KernelLaunch& l : plan)
    if (Status s = exec.run(l, hb); !s.ok()) return s;
  return Status::Ok();
}

Status run_backward(const AttentionProblem& p, DType dtype, GpuFamily family,
                    const BackwardBuffers& b, KernelExecutor& exec) {
  if (Status s = check_supported(p, dtype); !s.ok()) return s;
  const size_t st = storage_bytes(dtype);
  if (b.dbias) std::memset(b.dbias, 0, size_t(p.bias.size()) * sizeof(float));
  if (p.batch == 0 || p.q_heads == 0) return Status::Ok();
  if (p.q_len == 0 || p.kv_len == 0) {
    std::memset(b.dq, 0, size_t(p.batch * p.q_len * p.q_heads * p.head_dim) * st);
    std::memset(b.dk, 0, size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st);
    std::memset(b.dv, 0, size_t(p.batch * p.kv_len * p.kv_heads * p.head_dim) * st);
    return Status::Ok();
  }
  std::vector<KernelLaunch> plan = plan_backward(p, dtype, family);
  const bool sorted = segments_sorted(p, b);
  for (KernelLaunch& l : plan) l.params.segments_sorted = sorted;
  const bool row_sums = plan[0].params.dbias_mode == MFA_DBIAS_ROW_SUMS;
  std::vector<float> rows(row_sums ? size_t(p.batch * p.q_heads * p.q_len) : 0, 0.0f);

  HostBuffers hb;
  set_operands(b, hb);
  hb.set(Arg::Lse, b.lse);
  hb.set(Arg::DOut, b.dout);
  hb.set(Arg::Delta, b.delta);
  hb.set(Arg::DQ, b.dq);
  hb.set(Arg::DK, b.dk);
  hb.set(Arg::DV, b.dv);
  // Split dK/dV threadgroups accumulate dbias into slots of a scratch buffer.
  const KernelLaunch& kv = plan[1];
  const int64_t slot = kv.params.dbias_slot;
  std::vector<float> slots(size_t(slot * kv.params.kv_splits), 0.0f);
  hb.set(Arg::DBias, kv.params.dbias_mode != MFA_DBIAS_KEYS ? nullptr
                     : slot > 0                             ? slots.data()
                                                            : b.dbias);
  hb.set(Arg::DBiasRows, row_sums ? rows.data() : nullptr);
  // A split GQA group's float32 partial dK/dV (summed by plan[2]).
  const size_t partials = plan.size() > 2 ? size_t(kv.params.group_splits) *
                                                size_t(p.batch * p.kv_heads * p.kv_len * p.head_dim)
                                          : 0;
  std::vector<float> dk_partial(partials), dv_partial(partials);
  hb.set(Arg::DKPartial, partials ? dk_partial.data() : nullptr);
  hb.set(Arg::DVPartial, partials ? dv_partial.data() : nullptr);
  for (const KernelLaunch& l : plan)
    if (Status s = exec.run(l, hb); !s.ok()) return s;

  if (slot > 0) {
    float* dbias = static_cast<float*>(b.dbias);
    for (int64_t s = 0; s < kv.params.kv_splits; ++s)
      for (int64_t e = 0; e < slot; ++e) dbias[e] += slots[size_t(s * slot + e)];
  }
  if (row_sums) {
    // Bias constant along keys: reduce the row sums over the broadcast dims
    // (B * N * T additions on the host; the GPU did the S-long sums).
    float* dbias = static_cast<float*>(b.dbias);
    for (int64_t bb = 0; bb < p.batch; ++bb)
      for (int64_t n = 0; n < p.q_heads; ++n)
        for (int64_t i = 0; i < p.q_len; ++i)
          dbias[p.bias.offset(bb, n, i, 0)] += rows[size_t((bb * p.q_heads + n) * p.q_len + i)];
  }
  return Status::Ok();
}

}  // namespace metal_host
}  // namespace jax_mfa
