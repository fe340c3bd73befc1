// Unit tests of the Metal launcher's shared logic (cpp/metal_host/host_policy.h
// and the launch plan): built and run by tests/host/test_host_policy.py.
// `host_policy_test` runs every test; `host_policy_test --libraries` prints
// each library's macros and kernel names for the Python side to check against
// metal/attention.metal.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "metal_host/attention_plan.h"
#include "metal_host/host_policy.h"

using namespace jax_mfa;
using namespace jax_mfa::metal_host;

static int failures = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);              \
      ++failures;                                                                \
    }                                                                            \
  } while (0)

constexpr size_t kPage = 16384;  // Apple silicon's page size

const void* at(uintptr_t address) { return reinterpret_cast<const void*>(address); }

// Every binding lands on its operand, inside a page-aligned region; regions
// are disjoint in pages.
void check_wrap_invariants(const std::vector<HostRange>& ops, const WrapPlan& plan, size_t page) {
  CHECK(plan.bindings.size() == ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const RegionBinding& b = plan.bindings[i];
    if (ops[i].bytes == 0 || ops[i].ptr == nullptr) {
      CHECK(b.region == -1);
      continue;
    }
    CHECK(b.region >= 0 && b.region < int(plan.regions.size()));
    const WrappedRegion& r = plan.regions[size_t(b.region)];
    CHECK(r.base % page == 0 && r.length % page == 0 && r.length > 0);
    CHECK(r.base + b.offset == reinterpret_cast<uintptr_t>(ops[i].ptr));
    CHECK(b.offset + ops[i].bytes <= r.length);
  }
  for (size_t a = 1; a < plan.regions.size(); ++a)
    CHECK(plan.regions[a - 1].base + plan.regions[a - 1].length <= plan.regions[a].base);
}

void test_wrap_plan() {
  const uintptr_t base = 1000 * kPage;
  // An aligned operand of two pages and a bit: three pages, offset 0.
  {
    std::vector<HostRange> ops = {{at(base), 2 * kPage + 1}};
    WrapPlan plan = plan_wrapped_regions(ops, kPage);
    check_wrap_invariants(ops, plan, kPage);
    CHECK(plan.regions.size() == 1 && plan.regions[0].base == base &&
          plan.regions[0].length == 3 * kPage && plan.bindings[0].offset == 0);
  }
  // An operand at the end of a page (64-byte aligned, as XLA's) spills into
  // the next page: both pages, bound at its offset.
  {
    std::vector<HostRange> ops = {{at(base + kPage - 64), 128}};
    WrapPlan plan = plan_wrapped_regions(ops, kPage);
    check_wrap_invariants(ops, plan, kPage);
    CHECK(plan.regions.size() == 1 && plan.regions[0].length == 2 * kPage &&
          plan.bindings[0].offset == kPage - 64);
    // ... and one that ends exactly at the page end stays in one page.
    ops = {{at(base + kPage - 64), 64}};
    plan = plan_wrapped_regions(ops, kPage);
    CHECK(plan.regions.size() == 1 && plan.regions[0].length == kPage);
  }
  // Zero-size and absent operands get no region.
  {
    std::vector<HostRange> ops = {{at(base), 0}, {nullptr, 64}, {at(base + 64), 64}};
    WrapPlan plan = plan_wrapped_regions(ops, kPage);
    check_wrap_invariants(ops, plan, kPage);
    CHECK(plan.bindings[0].region == -1 && plan.bindings[1].region == -1);
    CHECK(plan.regions.size() == 1);
  }
  // Overlapping operands (an alias, a partial overlap) and neighbours sharing
  // a page are one region; a distant operand is another.
  {
    std::vector<HostRange> ops = {{at(base + 64), 4 * kPage},
                                  {at(base + 64), 4 * kPage},
                                  {at(base + 2 * kPage), 3 * kPage},
                                  {at(base + 4 * kPage + 128), 64},
                                  {at(base + 50 * kPage), 64}};
    WrapPlan plan = plan_wrapped_regions(ops, kPage);
    check_wrap_invariants(ops, plan, kPage);
    CHECK(plan.regions.size() == 2);
    CHECK(plan.bindings[0].region == plan.bindings[1].region);
    CHECK(plan.bindings[0].region == plan.bindings[2].region);
    CHECK(plan.bindings[0].region == plan.bindings[3].region);
    CHECK(plan.bindings[4].region != plan.bindings[0].region);
    CHECK(plan.regions[0].length == 5 * kPage);
  }
  // Random operand sets, in any order, on two page sizes.
  std::mt19937_64 rng(7);
  for (size_t page : {size_t(4096), kPage}) {
    for (int trial = 0; trial < 2000; ++trial) {
      std::vector<HostRange> ops(1 + rng() % 12);
      for (HostRange& op : ops) {
        op.ptr = at(base + (rng() % (64 * page)) / 64 * 64);
        op.bytes = rng() % 5 == 0 ? 0 : 1 + rng() % (4 * page);
      }
      check_wrap_invariants(ops, plan_wrapped_regions(ops, page), page);
    }
  }
}

void test_buffer_pool() {
  BufferPool<int> pool(1000);
  CHECK(!pool.take(1));
  CHECK(pool.give(1, 400).empty());
  CHECK(pool.give(2, 300).empty());
  CHECK(pool.pooled_bytes() == 700);
  // Best fit: 250 bytes take the 300-byte buffer.
  auto got = pool.take(250);
  CHECK(got && *got == 2 && pool.pooled_bytes() == 400);
  CHECK(!pool.take(500));
  // Over budget: the oldest is evicted.
  CHECK(pool.give(3, 500).empty());
  auto dropped = pool.give(4, 300);
  CHECK(dropped.size() == 1 && dropped[0] == 1);
  CHECK(pool.pooled_bytes() == 800 && pool.size() == 2);
  // Larger than the whole budget: never pooled.
  dropped = pool.give(5, 1001);
  CHECK(dropped.size() == 1 && dropped[0] == 5 && pool.pooled_bytes() == 800);
  // The default budget bounds what a large call can pin.
  BufferPool<int> big(kBufferPoolBudget);
  for (int i = 0; i < 100; ++i) big.give(i, size_t(64) << 20);
  CHECK(big.pooled_bytes() <= kBufferPoolBudget);
}

void test_in_flight_cap() {
  for (int cap : {1, 4, kMaxCommandBuffersInFlight}) {
    for (int64_t chunks : {int64_t(0), int64_t(1), int64_t(cap), int64_t(100)}) {
      std::vector<bool> done(size_t(chunks), false);
      int64_t in_flight = 0, max_in_flight = 0, oldest = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t w = chunk_to_wait_for(c, cap);
        if (w >= 0) {
          CHECK(w == oldest && !done[size_t(w)]);
          done[size_t(w)] = true;
          ++oldest;
          --in_flight;
        }
        ++in_flight;
        max_in_flight = std::max(max_in_flight, in_flight);
      }
      CHECK(max_in_flight <= cap);
      CHECK(max_in_flight <= 64);  // MTLCommandQueue's default limit
    }
  }
}

void test_device_choice() {
  int default_calls = 0;
  auto no_default = [&]() -> std::optional<DeviceDescription> {
    ++default_calls;
    return std::nullopt;
  };
  // The first Apple7+ device of the enumeration; the default is not created.
  DeviceChoice c = choose_device({{"AMD Radeon Pro", false, false}, {"Apple M3", true, true},
                                  {"Apple M1", true, false}},
                                 no_default);
  CHECK(c.source == DeviceChoice::Enumerated && c.index == 1 && c.family == GpuFamily::Apple9);
  CHECK(default_calls == 0);
  c = choose_device({{"Apple M2", true, false}}, no_default);
  CHECK(c.index == 0 && c.family == GpuFamily::Apple7);
  // Nothing enumerated: the system default, if it is Apple7+.
  c = choose_device({}, [&]() -> std::optional<DeviceDescription> {
    ++default_calls;
    return DeviceDescription{"Apple M1", true, false};
  });
  CHECK(c.source == DeviceChoice::SystemDefault && default_calls == 1);
  // None usable: the reason names what was seen.
  c = choose_device({{"Intel UHD Graphics 630", false, false}},
                    [] { return std::optional<DeviceDescription>(DeviceDescription{"AMD", false, false}); });
  CHECK(c.source == DeviceChoice::None && c.index == -1);
  CHECK(c.reason.find("Intel UHD Graphics 630") != std::string::npos &&
        c.reason.find("AMD (system default)") != std::string::npos);
  c = choose_device({}, no_default);
  CHECK(c.source == DeviceChoice::None && c.reason.find("no Metal device found") == 0);
}

void test_libraries() {
  std::set<int> indices;
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    for (int h : {1, 16, 17, 64, 72, 80, 128, 200, 256}) {
      const LibraryKey key = library_key(t, h);
      CHECK(key.head_pad == head_bucket(h));
      indices.insert(library_index(key));
      for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9}) {
        // The library holds exactly the kernels the plans of that head dim name.
        const std::vector<std::string> names = library_kernels(key, f);
        AttentionProblem p;
        p.batch = 1, p.q_len = 5, p.kv_len = 7, p.q_heads = 2, p.kv_heads = 1, p.head_dim = h;
        const std::vector<KernelLaunch> bwd = plan_backward(p, t, f);
        const std::vector<KernelLaunch> dec = plan_decode(p, t);
        CHECK(names.size() == 6 && names[0] == plan_forward(p, t, f).kernel &&
              names[1] == bwd[0].kernel && names[2] == bwd[1].kernel &&
              names[3] == dec[0].kernel && names[4] == dec[1].kernel);
        // A split GQA group adds the reduction kernel (MQA, B = 1, long T).
        p.q_len = 2048, p.kv_len = 2048, p.q_heads = 8;
        const std::vector<KernelLaunch> split = plan_backward(p, t, f);
        CHECK(split.size() == 3 && split[1].kernel == bwd[1].kernel && names[5] == split[2].kernel);
        for (const auto& [macro, value] : library_macros(key, f))
          CHECK(value > 0 && (macro == "JAX_MFA_METAL_FAMILIES" || (value & (value - 1)) == 0));
      }
    }
  }
  CHECK(indices.size() == 3 * 8);  // buckets hit above: 16, 24, 64, 72, 80, 128, 200, 256
}

AttentionProblem merged_bias_problem(int64_t B, int64_t N, int64_t K, int64_t T, int64_t S) {
  AttentionProblem p;
  p.batch = B, p.q_len = T, p.kv_len = S, p.q_heads = N, p.kv_heads = K, p.head_dim = 128;
  p.bias.present = true;
  p.bias.dims[0] = 1, p.bias.dims[1] = 1, p.bias.dims[2] = T, p.bias.dims[3] = S;
  p.bias.strides[0] = 0, p.bias.strides[1] = 0, p.bias.strides[2] = S, p.bias.strides[3] = 1;
  return p;
}

void test_serial_work_bound() {
  for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9}) {
    // Bias (1, 1, T, S) merges all B * K pairs into one threadgroup per key
    // block: 16 * 8 pairs of 8K queries is ~4x the bound unsplit.
    const AttentionProblem p = merged_bias_problem(16, 8, 8, 8192, 8192);
    const KernelLaunch kv = plan_backward(p, DType::F16, f)[1];
    CHECK(kv.params.merge_batches && kv.params.merge_heads);
    CHECK(kv.params.kv_splits > 1);
    CHECK(kv.work_per_group <= max_work_per_threadgroup());
    CHECK(int64_t(kv.params.kv_splits) * kv.params.pairs_per_split >= 16 * 8);
    CHECK(int64_t(kv.params.kv_splits - 1) * kv.params.pairs_per_split < 16 * 8);
    CHECK(kv.params.dbias_slot == p.bias.size());
    CHECK(kv.total_groups == int64_t(kv.params.num_row_blocks) * kv.params.kv_splits);
    for (const ArgBinding& a : kv.args)
      if (a.arg == Arg::DBias) CHECK(a.bytes == size_t(kv.params.kv_splits * p.bias.size()) * 4);
    // A small problem stays in one slice and writes dbias directly.
    const KernelLaunch small = plan_backward(merged_bias_problem(2, 2, 2, 64, 64), DType::F32, f)[1];
    CHECK(small.params.kv_splits == 1 && small.params.dbias_slot == 0);
    // The forward and dQ threadgroups loop over keys only: 2 (3) * P * S * HP.
    const KernelLaunch fwd = plan_forward(p, DType::F16, f);
    CHECK(fwd.work_per_group <= max_work_per_threadgroup());
  }
}

void test_chunks_cover_the_grid() {
  for (int64_t S : {1, 100, 5000, 70000}) {
    AttentionProblem p = merged_bias_problem(3, 4, 2, 333, S);
    for (const KernelLaunch& l :
         {plan_forward(p, DType::F32, GpuFamily::Apple9), plan_backward(p, DType::F32, GpuFamily::Apple9)[0],
          plan_backward(p, DType::F32, GpuFamily::Apple9)[1]}) {
      int64_t next = 0;
      for (const Chunk& c : l.chunks) {
        CHECK(c.group_offset == next && c.groups > 0);
        CHECK(c.groups == 1 || c.groups * l.work_per_group <= max_work_per_command_buffer());
        next += c.groups;
      }
      CHECK(next == l.total_groups);
    }
  }
}

// Split-key decode: chosen for few queries over many keys; the splits cover
// the keys exactly, fill the GPU, and stay within the merge kernel's bound.
void test_decode_plan() {
  AttentionProblem p;
  p.batch = 1, p.q_len = 1, p.kv_len = 32768, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128;
  CHECK(use_decode(p));
  const std::vector<KernelLaunch> d = plan_decode(p, DType::F16);
  const AttentionParams& a = d[0].params;
  CHECK(a.num_row_blocks == 1);  // T * G = 4 rows: one 8-row tile per kv head
  CHECK(int64_t(a.decode_splits) * a.decode_keys_per_split >= p.kv_len);
  CHECK(int64_t(a.decode_splits - 1) * a.decode_keys_per_split < p.kv_len);
  CHECK(a.decode_keys_per_split % kDecodeCols == 0 && a.decode_keys_per_split >= kDecodeMinKeysPerSplit);
  CHECK(d[0].total_groups == 8 * int64_t(a.decode_splits));
  CHECK(d[0].total_groups >= kDecodeTargetGroups);
  CHECK(d[1].total_groups == 32 && d[1].params.decode_splits == a.decode_splits);
  CHECK(d[0].threads_per_group == 32 && d[0].threadgroup_memory == 0);
  // T = 8 with G = 4: 32 rows, 4 tiles; a short or long-query problem is not decode.
  p.q_len = 8;
  CHECK(use_decode(p) && plan_decode(p, DType::F32)[0].params.num_row_blocks == 4);
  p.q_len = 9;
  CHECK(!use_decode(p));
  p.q_len = 1, p.kv_len = 100;
  CHECK(!use_decode(p));
  // Never more splits than the merge kernel holds.
  p.kv_len = int64_t(1) << 30, p.kv_heads = 1, p.q_heads = 1;
  CHECK(plan_decode(p, DType::F32)[0].params.decode_splits <= MFA_MAX_DECODE_SPLITS);
}

// Split GQA group in dK/dV: MQA with B = 1 spreads the group's heads over
// more threadgroups (each with less serial work) and adds the reduction;
// a grid that is already large, or a short problem, keeps one threadgroup
// per key block and no scratch; a group too long for one threadgroup is
// split within the serial-work bound.
void test_group_split_plan() {
  for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9}) {
    AttentionProblem p;
    p.batch = 1, p.q_len = 2048, p.kv_len = 2048, p.q_heads = 8, p.kv_heads = 1, p.head_dim = 128;
    AttentionProblem mha = p;
    mha.q_heads = mha.kv_heads = 1;
    const KernelLaunch one = plan_backward(mha, DType::F16, f)[1];  // G = 1: never split
    CHECK(one.params.group_splits == 1);
    const std::vector<KernelLaunch> plan = plan_backward(p, DType::F16, f);
    CHECK(plan.size() == 3);
    const KernelLaunch& kv = plan[1];
    const int64_t blocks = kv.params.num_row_blocks;
    const int64_t parts = (kv.config.head_pad + kv.config.head_out - 1) / kv.config.head_out;
    CHECK(kv.params.group_splits == 8 && kv.params.heads_per_group_split == 1);
    CHECK(kv.total_groups == 8 * blocks * parts);       // the grid grows 8x
    CHECK(kv.work_per_group == one.work_per_group);     // one query head each
    const size_t partial = size_t(8) * 2048 * 128 * 4;
    int found = 0;
    for (const ArgBinding& a : kv.args)
      if (a.arg == Arg::DKPartial || a.arg == Arg::DVPartial) found += a.bytes == partial;
    CHECK(found == 2);
    const KernelLaunch& red = plan[2];
    CHECK(red.pass == Pass::BackwardKeyValueReduce && red.threads_per_group == MFA_REDUCE_THREADS);
    CHECK(red.total_groups * MFA_REDUCE_THREADS >= 2048 * 128 &&
          (red.total_groups - 1) * MFA_REDUCE_THREADS < 2048 * 128);
    CHECK(red.params.group_splits == 8 && red.args.size() == 4 && red.args[0].bytes == partial);
    // Enough (batch, kv head) pairs fill the GPU unsplit: today's path, no scratch.
    AttentionProblem wide = p;
    wide.batch = 8, wide.q_heads = 32, wide.kv_heads = 8;
    const std::vector<KernelLaunch> unsplit = plan_backward(wide, DType::F16, f);
    CHECK(unsplit.size() == 2 && unsplit[1].params.group_splits == 1 &&
          unsplit[1].params.heads_per_group_split == 4);
    for (const ArgBinding& a : unsplit[1].args)
      if (a.arg == Arg::DKPartial || a.arg == Arg::DVPartial) CHECK(a.bytes == 0);
    // Too few query rows per split to pay for it: unsplit.
    AttentionProblem short_q = p;
    short_q.q_len = 21, short_q.q_heads = 6;
    CHECK(plan_backward(short_q, DType::F32, f).size() == 2);
    // A long group exceeds the serial-work bound unsplit; split, it holds.
    AttentionProblem longq = p;
    longq.q_len = 65536, longq.q_heads = 32;
    const KernelLaunch lk = plan_backward(longq, DType::F16, f)[1];
    CHECK(lk.params.group_splits > 1 && lk.work_per_group <= max_work_per_threadgroup());
    CHECK(int64_t(lk.params.group_splits) * lk.params.heads_per_group_split >= 32 &&
          int64_t(lk.params.group_splits - 1) * lk.params.heads_per_group_split < 32);
    // A bias broadcast over heads merges pairs instead (one dbias writer).
    CHECK(plan_backward(merged_bias_problem(1, 8, 1, 2048, 2048), DType::F16, f)[1]
              .params.group_splits == 1);
  }
}

// Every configuration the plan can pick (= every instantiated kernel, see
// test_each_library_compiles_exactly_its_kernels) fits the register model's
// budget; the model counts what the header says.
void test_register_budget() {
  for (DType t : {DType::F32, DType::F16, DType::BF16})
  for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9})
    for (int h : kHeadBuckets)
      for (Pass pass : {Pass::Forward, Pass::BackwardQuery, Pass::BackwardKeyValue,
                        Pass::DecodePartial, Pass::DecodeMerge, Pass::BackwardKeyValueReduce}) {
        const BlockConfig c = block_config(pass, f, t, h);
        const RegisterEstimate r = register_estimate(pass, c, t, f);
        if (r.total() > kRegisterBudget)
          std::printf("over budget: pass %d family %d head %d dtype %d: %d registers\n", int(pass),
                      int(f), h, int(t), r.total());
        CHECK(r.total() <= kRegisterBudget);
        // 16-bit operands never cost more registers than float ones.
        CHECK(r.total() <= register_estimate(pass, c, DType::F32, f).total());
        CHECK(c.head_out > 0 && c.head_out % 8 == 0 && (c.head_out == c.head_pad ||
              (2 * c.head_out >= c.head_pad && 2 * c.head_out - c.head_pad < 16)));  // whole or halves
        if (pass != Pass::DecodeMerge && pass != Pass::BackwardKeyValueReduce)
          CHECK(c.head_block == 0 || (c.head_out % c.head_block == 0 && h % c.head_block == 0));
        // The register-cache rule (block_config): each pass flags only its
        // own operands; MFA's defaults are always cached; an operand left
        // uncached would leave the (float) budget if it were cached.
        const bool fwd = pass == Pass::Forward, dq = pass == Pass::BackwardQuery,
                   kv = pass == Pass::BackwardKeyValue;
        CHECK(c.cached_operand_count() == [&] {
          int n = 0;
          for (CacheFlag flag : cache_flags(pass)) n += c.*flag;
          return n;
        }());
        if (fwd) CHECK(c.cache_q || !mfa_forward_caches_q(h));
        if (dq) CHECK((c.cache_q && c.cache_dout) || !mfa_backward_caches_rows(h));
        if (kv) CHECK((c.cache_k && c.cache_v) || !mfa_backward_caches_rows(h));
        if (pass == Pass::DecodePartial) CHECK(c.cache_q == mfa_decode_caches_q(h));
        if (fwd || dq || kv)
          for (CacheFlag flag : cache_flags(pass)) {
            if (c.*flag) continue;
            BlockConfig more = c;
            more.*flag = true;
            CHECK(register_estimate(pass, more, DType::F32, f).total() > kRegisterBudget);
          }
      }
  // The counts themselves, on a configuration worked out by hand: M3 forward,
  // HP 64 (Q cached), C 128: O 16 + Q 16 + S 32 + flags 16 + 4 + scalars.
  const BlockConfig fwd64 = block_config(Pass::Forward, GpuFamily::Apple9, DType::F16, 64);
  const RegisterEstimate r = register_estimate(Pass::Forward, fwd64, DType::F32, GpuFamily::Apple9);
  CHECK(r.accumulators == 16 && r.cached_operands == 16 && r.score_tiles == 48 && r.transients == 4);
  CHECK(r.total() == 84 + kScalarRegisters);
  // float16 operands in half matrices: Q 8 (one register per lane per
  // matrix), the multiply's two operands 2; bfloat16 the same on M3+ (bfloat
  // matrices), widened to float on M1/M2 and in the decode kernel.
  const RegisterEstimate h = register_estimate(Pass::Forward, fwd64, DType::F16, GpuFamily::Apple9);
  CHECK(h.accumulators == 16 && h.cached_operands == 8 && h.score_tiles == 48 && h.transients == 2);
  CHECK(h.total() == 74 + kScalarRegisters);
  const RegisterEstimate b9 = register_estimate(Pass::Forward, fwd64, DType::BF16, GpuFamily::Apple9);
  CHECK(b9.cached_operands == 8 && b9.transients == 2 && b9.total() == h.total());
  CHECK(register_estimate(Pass::Forward, fwd64, DType::BF16, GpuFamily::Apple7).total() == r.total());
  for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9}) {
    CHECK(operand_registers(Pass::DecodePartial, DType::BF16, f) == 2);
    CHECK(operand_registers(Pass::DecodePartial, DType::F16, f) == 1);
    CHECK(operand_registers(Pass::BackwardKeyValue, DType::F32, f) == 2);
  }
  CHECK(operand_registers(Pass::BackwardQuery, DType::BF16, GpuFamily::Apple9) == 1);
  CHECK(operand_registers(Pass::BackwardKeyValue, DType::BF16, GpuFamily::Apple9) == 1);
  CHECK(operand_registers(Pass::BackwardQuery, DType::BF16, GpuFamily::Apple7) == 2);
  // dQ with Q and dO cached: 4 x HB registers in float, 2 x HB in float16.
  const BlockConfig dq64 = block_config(Pass::BackwardQuery, GpuFamily::Apple9, DType::F16, 64);
  CHECK(dq64.cache_q && dq64.cache_dout);
  CHECK(register_estimate(Pass::BackwardQuery, dq64, DType::F32, GpuFamily::Apple9).cached_operands == 32);
  CHECK(register_estimate(Pass::BackwardQuery, dq64, DType::F16, GpuFamily::Apple9).cached_operands == 16);
  // Past MFA's defaults the budget decides, operand by operand: M3 dQ at
  // HP 88, C 64 caches Q (dQ 22 + Q 22 + S, dP 32 + 4 + scalars = 108) but
  // not dO (it would take 130); at HP 72 both fit (18 + 36 + 32 + 4 + 28).
  const BlockConfig dq88 = block_config(Pass::BackwardQuery, GpuFamily::Apple9, DType::F16, 88);
  CHECK(dq88.cols == 64 && dq88.cache_q && !dq88.cache_dout);
  CHECK(register_estimate(Pass::BackwardQuery, dq88, DType::F32, GpuFamily::Apple9).total() == 108);
  CHECK(kernel_name(Pass::BackwardQuery, DType::F16, dq88) == "mfa_dq_f16_h88_p16_c64_d8_cache10");
  const BlockConfig dq72 = block_config(Pass::BackwardQuery, GpuFamily::Apple9, DType::F16, 72);
  CHECK(dq72.cache_q && dq72.cache_dout);
  CHECK(register_estimate(Pass::BackwardQuery, dq72, DType::F32, GpuFamily::Apple9).total() == 118);
  // The forward at M3 HP 128 (mixed table, C 128) keeps Q in memory: O 32 +
  // Q 32 + S 48 + 4 + 28 = 144 would leave the budget.
  CHECK(!block_config(Pass::Forward, GpuFamily::Apple9, DType::F16, 128).cache_q);
  // dK/dV at HP 256 splits its head columns: two accumulators of 128 / 8 matrices.
  const BlockConfig kv = block_config(Pass::BackwardKeyValue, GpuFamily::Apple9, DType::F16, 256);
  CHECK(kv.head_out == 128 && register_estimate(Pass::BackwardKeyValue, kv, DType::F16, GpuFamily::Apple9).accumulators == 64);
  // Float32 storage takes MFA's float32 tables (M1 forward up to 56: P 32, C 32,
  // DB 56 -> 40 for bucket 40); their C is lowered by rule where it leaves the
  // budget (M3 forward 256: MFA's C 128 -> 80: O 64 + S 30 + 4 + scalars).
  const BlockConfig f40 = block_config(Pass::Forward, GpuFamily::Apple7, DType::F32, 40);
  CHECK(f40.rows == 32 && f40.cols == 32 && f40.head_block == 40);
  const BlockConfig f256 = block_config(Pass::Forward, GpuFamily::Apple9, DType::F32, 256);
  CHECK(f256.cols == 80 && register_estimate(Pass::Forward, f256, DType::F32, GpuFamily::Apple9).total() == 126);
  // Uneven dK/dV head splits (test_uneven_dkdv_head_split runs these):
  // 21 and 25 blocks of 8 head columns, 11 and 13 in the first part.
  CHECK(block_config(Pass::BackwardKeyValue, GpuFamily::Apple7, DType::F32, 168).head_out == 88);
  CHECK(block_config(Pass::BackwardKeyValue, GpuFamily::Apple9, DType::F32, 200).head_out == 104);
}

// mfa_tile_fully_visible (metal/attention_params.h: which tiles the kernels
// run without per-element masks) against a brute force over problem.h's
// key_span: true exactly when every entry of the tile is allowed, on random
// lengths, causal and windows, with tiles reaching past both valid lengths.
void test_tile_classes() {
  std::mt19937 gen(11);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); };
  int visible = 0, edge = 0;
  for (int trial = 0; trial < 400; ++trial) {
    AttentionProblem p;
    p.q_len = uniform(1, 80);
    p.kv_len = uniform(1, 80);
    p.causal = uniform(0, 1);
    p.window_left = uniform(0, 2) ? -1 : uniform(0, 40);
    p.window_right = uniform(0, 2) ? -1 : uniform(0, 40);
    const int q_valid = uniform(0, int(p.q_len)), kv_valid = uniform(0, int(p.kv_len));
    for (int tile = 0; tile < 20; ++tile) {
      const int i0 = uniform(0, int(p.q_len)), i1 = i0 + uniform(1, 24);
      const int j0 = uniform(0, int(p.kv_len)), j1 = j0 + uniform(1, 40);
      bool all = true;
      for (int i = i0; i < i1 && all; ++i) {
        const Span keys = p.key_span(i, q_valid, kv_valid);
        all = i < q_valid && keys.begin <= j0 && keys.end >= j1 && j1 <= kv_valid;
      }
      const bool got = mfa_tile_fully_visible(i0, i1, j0, j1, q_valid, kv_valid, p.causal,
                                              int(p.window_left), int(p.window_right));
      if (got != all)
        std::printf("tile class: rows [%d, %d) keys [%d, %d) q_valid %d kv_valid %d causal %d "
                    "window (%d, %d): got %d\n", i0, i1, j0, j1, q_valid, kv_valid, int(p.causal),
                    int(p.window_left), int(p.window_right), int(got));
      CHECK(got == all);
      (all ? visible : edge) += 1;
    }
  }
  CHECK(visible > 100 && edge > 100);  // both classes were exercised
}

void print_libraries() {
  for (DType t : {DType::F32, DType::F16, DType::BF16})
    for (int h : kHeadBuckets)
      for (GpuFamily f : {GpuFamily::Apple7, GpuFamily::Apple9}) {
        const LibraryKey key = library_key(t, h);
        for (const auto& [macro, value] : library_macros(key, f))
          std::printf("-D%s=%d ", macro.c_str(), value);
        for (const std::string& name : library_kernels(key, f)) std::printf("%s ", name.c_str());
        std::printf("\n");
      }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--libraries") == 0) {
    print_libraries();
    return 0;
  }
  test_wrap_plan();
  test_buffer_pool();
  test_in_flight_cap();
  test_device_choice();
  test_libraries();
  test_serial_work_bound();
  test_chunks_cover_the_grid();
  test_decode_plan();
  test_group_split_plan();
  test_register_budget();
  test_tile_classes();
  std::printf("%s\n", failures == 0 ? "all host policy tests passed" : "host policy tests FAILED");
  return failures == 0 ? 0 : 1;
}
