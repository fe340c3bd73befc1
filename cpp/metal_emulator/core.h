// Core of the Metal emulator: checked address-space pointers, fibers, the
// per-threadgroup SIMT scheduler (barriers, SIMD-group collectives), the race /
// bounds / write-conflict checkers and the kernel registry.
//
// Everything is header-only (inline), so a kernel library compiled at run time
// and the extension built by CMake each carry one copy of the registry.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <algorithm>
#include <array>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common/parallel.h"
#include "metal_emulator/types.h"

// Fibers switch with a few lines of assembly on x86-64 and aarch64, and with
// ucontext elsewhere (or when JAX_MFA_EMU_FORCE_UCONTEXT is defined).
#if defined(JAX_MFA_EMU_FORCE_UCONTEXT) || !(defined(__x86_64__) || defined(__aarch64__))
#include <ucontext.h>
#define JAX_MFA_EMU_UCONTEXT 1
#endif

// Hidden visibility: every shared object gets its own registry, workers and
// statics (default-visibility inline statics would be merged process-wide).
#pragma GCC visibility push(hidden)

namespace metal {
namespace detail {

enum ErrorKind : int {
  kOk = 0,
  kInvalid = 1,
  kRace = 2,
  kDivergence = 3,
  kOutOfBounds = 4,
  kThreadgroupMemory = 5,
  kWriteConflict = 6,
};

enum Space : int { kDeviceSpace = 1, kConstantSpace = 2, kThreadgroupSpace = 3 };

struct Site {
  const char* file;
  int line;
  bool operator==(const Site& o) const { return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0); }
  bool operator!=(const Site& o) const { return !(*this == o); }
};
#define JAX_MFA_EMU_SITE_PARAMS const char *jm_file = __builtin_FILE(), int jm_line = __builtin_LINE()
#define JAX_MFA_EMU_SITE ::metal::detail::Site{jm_file, jm_line}

// A device buffer, constant buffer or threadgroup region.
struct Region {
  char* base = nullptr;
  size_t size = 0;
  int index = 0;  // [[buffer(i)]] / [[threadgroup(i)]], or -1 for a kernel-scope threadgroup array
  int space = kDeviceSpace;
  // Device buffers written by the kernel: per byte, the last write as
  // (threadgroup + 1) << 32 | thread << 21 | device-barrier epoch (0: none).
  std::atomic<uint64_t>* owner = nullptr;
  bool checked = true;   // false: attached only for the profile (check=False)
  bool profile = false;  // count the bytes of accesses (dispatch(..., profile=True))
  // Set for an argument that does not exist in this dispatch (its function
  // constant is false): `size` zero bytes that read as 0 and cannot be written.
  const char* absent = nullptr;
};

// The instruction profile's counters (see docs/metal_emulator.md). Per
// simdgroup: collectives count once per simdgroup; byte counts and
// special-function calls are summed over the simdgroup's lanes.
#define JAX_MFA_EMU_COUNTERS(X)                                                        \
  X(simdgroup_matrix_multiply_accumulate) X(simdgroup_matrix_load_device)              \
  X(simdgroup_matrix_load_constant) X(simdgroup_matrix_load_threadgroup)               \
  X(simdgroup_matrix_store_device) X(simdgroup_matrix_store_threadgroup)               \
  X(device_bytes_read) X(device_bytes_written) X(constant_bytes_read)                  \
  X(threadgroup_bytes_read) X(threadgroup_bytes_written) X(threadgroup_barriers)       \
  X(simdgroup_barriers) X(simd_shuffles) X(simd_reductions)                            \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sqrt) X(rsqrt) X(sin) X(cos)       \
  X(tan) X(sinh) X(cosh) X(tanh) X(asin) X(acos) X(atan) X(atan2) X(pow) X(powr) X(erf)   \
  X(simdgroup_matrix_multiply_accumulate_16bit) X(device_accesses) X(threadgroup_accesses)
enum Counter : int {
#define JAX_MFA_EMU_ENUM(name) kCount_##name,
  JAX_MFA_EMU_COUNTERS(JAX_MFA_EMU_ENUM)
#undef JAX_MFA_EMU_ENUM
  kNumCounters
};
inline const char* counter_name(int c) {
  static const char* const names[] = {
#define JAX_MFA_EMU_NAME(name) #name,
      JAX_MFA_EMU_COUNTERS(JAX_MFA_EMU_NAME)
#undef JAX_MFA_EMU_NAME
  };
  return c >= 0 && c < kNumCounters ? names[c] : nullptr;
}
// Number of dispatches with profile=True running in this binary (a fast
// "is anyone profiling" test before the thread-local lookup).
inline std::atomic<int>& profiling_dispatches() {
  static std::atomic<int> n{0};
  return n;
}
inline void count(int counter, uint64_t v = 1, int tid = -1);
inline void count_access(int space, size_t n, bool write, int tid);

inline void access(const void* p, size_t n, const Region* r, bool write, int tid = -1);
inline void access_instruction(const void* p, size_t n, const Region* r, bool write);
inline void check_access(const void* p, size_t n, const Region* r, bool write, int tid = -1);
inline void access_atomic(const void* p, size_t n, const Region* r);

}  // namespace detail

// ---------------------------------------------------------------------------
// Checked pointers. `device T*` becomes device_ptr<T>, `threadgroup T*`
// threadgroup_ptr<T>, `constant T*` constant_ptr<T> (see the source pass in
// jax_mfa/metal_emulator/_generator.py). Distinct types per address space make
// mixing address spaces a compile error, as with Apple's compiler.
template <class T, int S>
struct as_ptr;

// A half/bfloat element converts implicitly to float, as in Metal (a
// non-template conversion, so that built-in operators such as `float += p[i]`
// find it; mixed arithmetic on such a proxy goes through the operators below).
template <class Ref, class V, bool = is_emu_float16<V>::value>
struct float16_ref_conversion {};
template <class Ref, class V>
struct float16_ref_conversion<Ref, V, true> {
  operator float() const { return float(static_cast<const Ref&>(*this).get()); }
};

template <class T, int S>
struct as_ref : float16_ref_conversion<as_ref<T, S>, std::remove_cv_t<T>> {
  using V = std::remove_cv_t<T>;
  T* p;
  const detail::Region* r;
  as_ref(T* p_, const detail::Region* r_) : p(p_), r(r_) {}
  as_ref(const as_ref&) = default;
  operator V() const {
    detail::access_instruction(p, sizeof(T), r, false);
    return *p;
  }
  V get() const { return *this; }
  // Other conversions of non-arithmetic elements are explicit: double(p[i]).
  template <class X, std::enable_if_t<std::is_arithmetic<X>::value && !std::is_same<X, V>::value &&
                                          !std::is_arithmetic<V>::value &&
                                          !(std::is_same<X, float>::value && is_emu_float16<V>::value), int> = 0>
  explicit operator X() const {
    return X(V(*this));
  }
  const as_ref& operator=(const V& v) const {
    static_assert(!std::is_const<T>::value, "write through a pointer to const");
    detail::access_instruction(p, sizeof(T), r, true);
    *p = v;
    return *this;
  }
  const as_ref& operator=(const as_ref& o) const { return *this = V(o); }
  template <class U, int S2>
  const as_ref& operator=(const as_ref<U, S2>& o) const { return *this = V(o.get()); }
  template <class X, std::enable_if_t<!std::is_same<X, V>::value && std::is_convertible<X, V>::value, int> = 0>
  const as_ref& operator=(const X& x) const { return *this = V(x); }
#define JAX_MFA_EMU_REF_OP(OP)                 \
  template <class X>                           \
  const as_ref& operator OP##=(const X& x) const { \
    V v = *this;                               \
    v OP## = x;                                \
    return *this = v;                          \
  }
  JAX_MFA_EMU_REF_OP(+) JAX_MFA_EMU_REF_OP(-) JAX_MFA_EMU_REF_OP(*) JAX_MFA_EMU_REF_OP(/)
  JAX_MFA_EMU_REF_OP(%) JAX_MFA_EMU_REF_OP(&) JAX_MFA_EMU_REF_OP(|) JAX_MFA_EMU_REF_OP(^)
  JAX_MFA_EMU_REF_OP(<<) JAX_MFA_EMU_REF_OP(>>)
#undef JAX_MFA_EMU_REF_OP
  const as_ref& operator++() const { V v = *this; ++v; return *this = v; }
  const as_ref& operator--() const { V v = *this; --v; return *this = v; }
  V operator++(int) const { V v = *this; V w = v; ++w; *this = w; return v; }
  V operator--(int) const { V v = *this; V w = v; --w; *this = w; return v; }
  as_ptr<T, S> operator&() const { return as_ptr<T, S>(p, r); }
};

template <class T, int S>
struct as_ptr {
  T* p = nullptr;
  const detail::Region* r = nullptr;
  constexpr as_ptr() = default;
  constexpr as_ptr(std::nullptr_t) {}
  constexpr as_ptr(T* p_, const detail::Region* r_) : p(p_), r(r_) {}
  template <class U, std::enable_if_t<!std::is_same<U, T>::value && std::is_convertible<U*, T*>::value, int> = 0>
  as_ptr(const as_ptr<U, S>& o) : p(o.p), r(o.r) {}
  template <class U, std::enable_if_t<!std::is_convertible<U*, T*>::value, int> = 0>
  explicit as_ptr(const as_ptr<U, S>& o) : p((T*)(o.p)), r(o.r) {}

  as_ref<T, S> operator[](ptrdiff_t i) const { return {p + i, r}; }
  as_ref<T, S> operator*() const { return {p, r}; }
  // Member access through -> is bounds-checked as a read of the whole
  // element (not counted in the profile).
  T* operator->() const {
    detail::check_access(p, sizeof(T), r, false);
    return p;
  }
  as_ptr operator+(ptrdiff_t i) const { return {p + i, r}; }
  as_ptr operator-(ptrdiff_t i) const { return {p - i, r}; }
  friend as_ptr operator+(ptrdiff_t i, const as_ptr& a) { return {a.p + i, a.r}; }
  ptrdiff_t operator-(const as_ptr& o) const { return p - o.p; }
  as_ptr& operator+=(ptrdiff_t i) { p += i; return *this; }
  as_ptr& operator-=(ptrdiff_t i) { p -= i; return *this; }
  as_ptr& operator++() { ++p; return *this; }
  as_ptr& operator--() { --p; return *this; }
  as_ptr operator++(int) { as_ptr t = *this; ++p; return t; }
  as_ptr operator--(int) { as_ptr t = *this; --p; return t; }
  bool operator==(const as_ptr& o) const { return p == o.p; }
  bool operator!=(const as_ptr& o) const { return p != o.p; }
  bool operator<(const as_ptr& o) const { return p < o.p; }
  explicit operator bool() const { return p != nullptr; }
};

template <class T, int S>
struct is_scalar_proxy<as_ref<T, S>> : is_emu_scalar<std::remove_cv_t<T>> {};

// Arithmetic and comparisons with a half/bfloat element proxy: the element's
// value takes part (as the operators of types.h define for half/bfloat).
template <class A, class B>
struct has_float16_ref : std::false_type {};
template <class T, int S, class B>
struct has_float16_ref<as_ref<T, S>, B> : is_emu_float16<std::remove_cv_t<T>> {};
template <class A, class T, int S>
struct has_float16_ref<A, as_ref<T, S>> : is_emu_float16<std::remove_cv_t<T>> {};
template <class T, int S, class U, int S2>
struct has_float16_ref<as_ref<T, S>, as_ref<U, S2>>
    : std::integral_constant<bool, is_emu_float16<std::remove_cv_t<T>>::value ||
                                       is_emu_float16<std::remove_cv_t<U>>::value> {};
template <class X>
inline auto ref_value(const X& x) { return x; }
template <class T, int S>
inline std::remove_cv_t<T> ref_value(const as_ref<T, S>& x) { return x.get(); }
#define JAX_MFA_EMU_REF16_OP(OP)                                                                  \
  template <class A, class B, std::enable_if_t<has_float16_ref<A, B>::value, int> = 0>             \
  inline auto operator OP(const A& a, const B& b) { return ref_value(a) OP ref_value(b); }
JAX_MFA_EMU_REF16_OP(+) JAX_MFA_EMU_REF16_OP(-) JAX_MFA_EMU_REF16_OP(*) JAX_MFA_EMU_REF16_OP(/)
JAX_MFA_EMU_REF16_OP(==) JAX_MFA_EMU_REF16_OP(!=) JAX_MFA_EMU_REF16_OP(<) JAX_MFA_EMU_REF16_OP(>)
JAX_MFA_EMU_REF16_OP(<=) JAX_MFA_EMU_REF16_OP(>=)
#undef JAX_MFA_EMU_REF16_OP

template <class T>
using device_ptr = as_ptr<T, detail::kDeviceSpace>;
template <class T>
using constant_ptr = as_ptr<T, detail::kConstantSpace>;
template <class T>
using threadgroup_ptr = as_ptr<T, detail::kThreadgroupSpace>;

namespace detail {

// ---------------------------------------------------------------------------
// Kernel parameters and registry.
enum BindKind : int {
  kBuffer = 0,
  kThreadgroupArg,
  kThreadPositionInGrid,
  kThreadgroupPositionInGrid,
  kThreadPositionInThreadgroup,
  kThreadIndexInThreadgroup,
  kThreadsPerThreadgroup,
  kThreadgroupsPerGrid,
  kThreadsPerGrid,
  kSimdgroupIndexInThreadgroup,
  kThreadIndexInSimdgroup,
  kSimdgroupsPerThreadgroup,
  kThreadsPerSimdgroup,
};
struct Binding {
  int kind;
  int index;
  int function_constant;  // [[buffer(n), function_constant(c)]]: index of c, else -1
  int used;               // 0: the parameter's name does not occur in the kernel's body
};
// Per parameter, derived from its C++ type at registration.
struct ParamInfo {
  int kind;
  int index;
  int space;       // for buffers: kDeviceSpace / kConstantSpace
  int is_pointer;  // 1: pointer, 0: reference (constant T&)
  int is_const;
  uint64_t size;   // sizeof the pointee / referenced object
  int function_constant;
  int used;
};

// ---------------------------------------------------------------------------
// Function constants: `constant T name [[function_constant(i)]];` becomes a
// function_constant<T, i>, whose value is looked up in the running dispatch
// (Metal fixes it per pipeline through MTLFunctionConstantValues).
enum FcType : int { kFcBool = 0, kFcInt = 1, kFcUint = 2, kFcFloat = 3, kFcHalf = 4, kFcBfloat = 5 };
struct FunctionConstantInfo {
  std::string name;
  int index;
  int type;
  int size;
};
inline std::vector<FunctionConstantInfo>& function_constant_registry() {
  static std::vector<FunctionConstantInfo> r;
  return r;
}
struct FunctionConstantValue {
  int index;
  uint64_t bits;
};
template <class T>
constexpr int fc_type() {
  return std::is_same<T, bool>::value       ? kFcBool
         : std::is_same<T, half>::value     ? kFcHalf
         : std::is_same<T, bfloat>::value   ? kFcBfloat
         : std::is_floating_point<T>::value ? kFcFloat
         : std::is_signed<T>::value         ? kFcInt
                                            : kFcUint;
}
// Defined after Worker: looks the index up in the running dispatch.
inline const FunctionConstantValue* find_function_constant(int index, const char* name, bool required);

template <class T, int I>
struct function_constant {
  static constexpr int kIndex = I;
  const char* name;
  explicit function_constant(const char* n) : name(n) {
    auto& r = function_constant_registry();
    for (auto& e : r)
      if (e.index == I) return;
    r.push_back({n, I, fc_type<T>(), int(sizeof(T))});
  }
  operator T() const {
    const FunctionConstantValue* v = find_function_constant(I, name, true);
    T t{};
    if (v) std::memcpy(&t, &v->bits, sizeof(T));
    return t;
  }
  bool defined() const { return find_function_constant(I, name, false) != nullptr; }
};
template <class T, int I>
constexpr int function_constant_index(const function_constant<T, I>&) {
  return I;
}

struct ThreadArgs {
  uint3 pos_grid, tg_pos, pos_tg, tptg, tgpg, tpg;
  uint index_tg, sg_index, lane, sgptg;
  const Region* bufs;
  const Region* tg;
  bool attach;  // pointers carry their region (checking or profiling)
};

struct KernelEntry {
  std::string name;
  void* fn;
  void (*run)(const KernelEntry&, ThreadArgs&);
  std::vector<Binding> bindings;
  std::vector<ParamInfo> params;
};

inline std::vector<std::unique_ptr<KernelEntry>>& registry() {
  static std::vector<std::unique_ptr<KernelEntry>> r;
  return r;
}
inline const KernelEntry* find_kernel(const char* name) {
  for (auto& e : registry())
    if (e->name == name) return e.get();
  return nullptr;
}

template <class P>
struct Binder {  // built-in values
  static P get(ThreadArgs& a, const Binding& b) {
    uint3 v(0u);
    switch (b.kind) {
      case kThreadPositionInGrid: v = a.pos_grid; break;
      case kThreadgroupPositionInGrid: v = a.tg_pos; break;
      case kThreadPositionInThreadgroup: v = a.pos_tg; break;
      case kThreadsPerThreadgroup: v = a.tptg; break;
      case kThreadgroupsPerGrid: v = a.tgpg; break;
      case kThreadsPerGrid: v = a.tpg; break;
      case kThreadIndexInThreadgroup: v = uint3(a.index_tg, 0u, 0u); break;
      case kSimdgroupIndexInThreadgroup: v = uint3(a.sg_index, 0u, 0u); break;
      case kThreadIndexInSimdgroup: v = uint3(a.lane, 0u, 0u); break;
      case kSimdgroupsPerThreadgroup: v = uint3(a.sgptg, 0u, 0u); break;
      case kThreadsPerSimdgroup: v = uint3(32u, 0u, 0u); break;
      default: break;
    }
    using Q = std::remove_cv_t<P>;
    if constexpr (is_emu_vec<Q>::value) {
      Q q;
      for (int i = 0; i < detail::comp_count<Q>::value; ++i) q.v[i] = typename Q::element_type(v.v[i]);
      return q;
    } else {
      return Q(v.x);
    }
  }
  static constexpr ParamInfo info(const Binding& b) { return {b.kind, b.index, 0, 0, 0, 0, -1, 1}; }
};
template <class T, int S>
struct Binder<as_ptr<T, S>> {
  static as_ptr<T, S> get(ThreadArgs& a, const Binding& b) {
    const Region& r = b.kind == kBuffer ? a.bufs[b.index] : a.tg[b.index];
    return as_ptr<T, S>(reinterpret_cast<T*>(r.base), a.attach ? &r : nullptr);
  }
  static ParamInfo info(const Binding& b) {
    return {b.kind, b.index, S, 1, std::is_const<T>::value ? 1 : 0, sizeof(T), b.function_constant, b.used};
  }
};
template <class T, int S>
struct Binder<const as_ptr<T, S>> : Binder<as_ptr<T, S>> {};
template <class T>
struct Binder<T&> {
  static T& get(ThreadArgs& a, const Binding& b) { return *reinterpret_cast<T*>(a.bufs[b.index].base); }
  static ParamInfo info(const Binding& b) {
    return {b.kind, b.index, std::is_const<T>::value ? kConstantSpace : kDeviceSpace, 0,
            std::is_const<T>::value ? 1 : 0, sizeof(T), b.function_constant, b.used};
  }
};

template <class... P>
struct Invoker {
  template <size_t... I>
  static void call(const KernelEntry& k, ThreadArgs& a, std::index_sequence<I...>) {
    auto f = reinterpret_cast<void (*)(P...)>(k.fn);
    f(Binder<P>::get(a, k.bindings[I])...);
  }
  static void run(const KernelEntry& k, ThreadArgs& a) { call(k, a, std::index_sequence_for<P...>{}); }
};

struct KernelRegistrar {
  template <class... P>
  KernelRegistrar(const char* name, void (*f)(P...), const Binding* b, int nb) {
    auto e = std::make_unique<KernelEntry>();
    e->name = name;
    e->fn = reinterpret_cast<void*>(f);
    e->run = &Invoker<P...>::run;
    if (nb != int(sizeof...(P))) {
      std::fprintf(stderr, "jax_mfa metal emulator: kernel %s: %d bindings for %d parameters\n", name, nb,
                   int(sizeof...(P)));
      std::abort();
    }
    e->bindings.assign(b, b + nb);
    int i = 0;
    ((e->params.push_back(Binder<P>::info(b[i])), ++i), ...);
    for (auto& old : registry())
      if (old->name == e->name) {
        old = std::move(e);
        return;
      }
    registry().push_back(std::move(e));
  }
};

// ---------------------------------------------------------------------------
// Fibers: a minimal callee-saved-register context switch.
#if defined(JAX_MFA_EMU_UCONTEXT)
// (ucontext: no assembly)
#elif defined(__x86_64__)
#if defined(__APPLE__)
#define JAX_MFA_EMU_SYM(x) "_" #x
#define JAX_MFA_EMU_WEAK(x) ".globl _" #x "\n.weak_definition _" #x "\n.private_extern _" #x "\n"
#else
#define JAX_MFA_EMU_SYM(x) #x
#define JAX_MFA_EMU_WEAK(x) ".weak " #x "\n.hidden " #x "\n.type " #x ",@function\n"
#endif
extern "C" void jax_mfa_emu_switch_v1(void** save_sp, void* new_sp);
extern "C" void jax_mfa_emu_trampoline_v1();
__asm__(".text\n" JAX_MFA_EMU_WEAK(jax_mfa_emu_switch_v1) JAX_MFA_EMU_SYM(jax_mfa_emu_switch_v1) ":\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
        JAX_MFA_EMU_WEAK(jax_mfa_emu_trampoline_v1) JAX_MFA_EMU_SYM(jax_mfa_emu_trampoline_v1) ":\n"
        "  movq %r12, %rdi\n  callq *%r13\n  ud2\n");
inline void* fiber_init_stack(char* top, void (*fn)(void*), void* arg) {
  uint64_t* t = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  // After `ret` into the trampoline, rsp = t - 2 (16-byte aligned) as `call` needs.
  t[-1] = 0;
  t[-2] = 0;
  t[-3] = reinterpret_cast<uint64_t>(&jax_mfa_emu_trampoline_v1);
  t[-4] = 0;                                   // rbp
  t[-5] = 0;                                   // rbx
  t[-6] = reinterpret_cast<uint64_t>(arg);     // r12
  t[-7] = reinterpret_cast<uint64_t>(fn);      // r13
  t[-8] = 0;                                   // r14
  t[-9] = 0;                                   // r15
  t[-10] = 0x1F80ull | (0x037Full << 32);      // mxcsr, x87 control word
  return t - 10;
}
inline void fiber_switch(void** save, void* to) { jax_mfa_emu_switch_v1(save, to); }
#elif defined(__aarch64__)
#if defined(__APPLE__)
#define JAX_MFA_EMU_SYM(x) "_" #x
#define JAX_MFA_EMU_WEAK(x) ".globl _" #x "\n.weak_definition _" #x "\n.private_extern _" #x "\n.p2align 2\n"
#else
#define JAX_MFA_EMU_SYM(x) #x
#define JAX_MFA_EMU_WEAK(x) ".weak " #x "\n.hidden " #x "\n.type " #x ",%function\n.p2align 2\n"
#endif
extern "C" void jax_mfa_emu_switch_v1(void** save_sp, void* new_sp);
extern "C" void jax_mfa_emu_trampoline_v1();
__asm__(".text\n" JAX_MFA_EMU_WEAK(jax_mfa_emu_switch_v1) JAX_MFA_EMU_SYM(jax_mfa_emu_switch_v1) ":\n"
        "  sub sp, sp, #176\n"
        "  stp x19, x20, [sp, #0]\n  stp x21, x22, [sp, #16]\n  stp x23, x24, [sp, #32]\n"
        "  stp x25, x26, [sp, #48]\n  stp x27, x28, [sp, #64]\n  stp x29, x30, [sp, #80]\n"
        "  stp d8, d9, [sp, #96]\n  stp d10, d11, [sp, #112]\n  stp d12, d13, [sp, #128]\n"
        "  stp d14, d15, [sp, #144]\n  mrs x2, fpcr\n  str x2, [sp, #160]\n"
        "  mov x2, sp\n  str x2, [x0]\n  mov sp, x1\n"
        "  ldp x19, x20, [sp, #0]\n  ldp x21, x22, [sp, #16]\n  ldp x23, x24, [sp, #32]\n"
        "  ldp x25, x26, [sp, #48]\n  ldp x27, x28, [sp, #64]\n  ldp x29, x30, [sp, #80]\n"
        "  ldp d8, d9, [sp, #96]\n  ldp d10, d11, [sp, #112]\n  ldp d12, d13, [sp, #128]\n"
        "  ldp d14, d15, [sp, #144]\n  ldr x2, [sp, #160]\n  msr fpcr, x2\n"
        "  add sp, sp, #176\n  ret\n"
        JAX_MFA_EMU_WEAK(jax_mfa_emu_trampoline_v1) JAX_MFA_EMU_SYM(jax_mfa_emu_trampoline_v1) ":\n"
        "  mov x0, x19\n  blr x20\n  brk #0\n");
inline void* fiber_init_stack(char* top, void (*fn)(void*), void* arg) {
  uint64_t* t = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  uint64_t* s = t - 22;  // 176 bytes
  std::memset(s, 0, 176);
  s[0] = reinterpret_cast<uint64_t>(arg);                          // x19
  s[1] = reinterpret_cast<uint64_t>(fn);                           // x20
  s[11] = reinterpret_cast<uint64_t>(&jax_mfa_emu_trampoline_v1);  // x30
  uint64_t fpcr;
  __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
  s[20] = fpcr;
  return s;
}
inline void fiber_switch(void** save, void* to) { jax_mfa_emu_switch_v1(save, to); }
#endif

// ---------------------------------------------------------------------------
// Per-worker (OS thread) state: fibers of the threadgroup being run, barrier
// and simdgroup rendezvous, threadgroup memory and its race shadow.
enum ThreadState : int { kReady = 0, kAtBarrier, kAtCollective, kDone };

struct FiberThread {
  void* sp = nullptr;
  char* stack = nullptr;
  int state = kReady;
  Site site{"", 0};
  const char* what = "";
  ThreadArgs args;
#if defined(JAX_MFA_EMU_UCONTEXT)
  ucontext_t uc;
#endif
};

struct SgSlot {
  int arrived = 0;
  int nactive = 0;
  int op = 0;
  const char* what = "";
  Site site{"", 0};
  void* data[32];
};

struct TgShadow {  // per threadgroup-memory byte
  uint16_t w_tid, r_tid, r_sg, pad;
  uint32_t w_ep, w_sgep, r_ep, r_sgep;
};
constexpr uint16_t kNone = 0xFFFF, kMany = 0xFFFE;

constexpr size_t kMaxThreadgroupMemory = 32768;
constexpr int kMaxThreads = 1024;

struct Dispatch {
  const KernelEntry* k = nullptr;
  uint3 grid, threads;
  int nthreads = 0;
  std::vector<Region> bufs;
  std::vector<Region> tg;  // template; bases are set per worker
  size_t tg_dynamic = 0;
  bool check = true;
  bool has_seed = false;
  uint64_t seed = 0;
  std::vector<FunctionConstantValue> function_constants;
  std::atomic<bool> failed{false};
  std::mutex mu;
  int kind = kOk;
  std::string msg;
  // Profile (profile = true): per simdgroup index summed over threadgroups,
  // the element-wise maximum over all simdgroups, and the largest
  // threadgroup memory in use (dynamic regions + kernel-scope arrays).
  bool profile = false;
  std::vector<std::array<uint64_t, kNumCounters>> prof_per_sg;
  std::array<uint64_t, kNumCounters> prof_max{};
  size_t prof_tg_memory = 0;
};

struct Worker {
  std::vector<FiberThread> threads;
  size_t stack_size = 0;
  void* sched_sp = nullptr;
#if defined(JAX_MFA_EMU_UCONTEXT)
  ucontext_t sched_uc;
#endif
  int cur = 0, n = 0;
  Dispatch* d = nullptr;
  uint3 tgid;
  uint64_t group_linear = 0;
  int barrier_arrived = 0, done = 0;
  Site barrier_site{"", 0};
  int barrier_flags = 0;
  SgSlot sg[32];
  uint32_t tg_epoch = 1;
  uint32_t sg_epoch[32];
  uint32_t dev_epoch = 1;
  alignas(64) char arena[kMaxThreadgroupMemory];
  std::vector<TgShadow> shadow;
  std::vector<Region> tg;
  struct Static {
    const void* uid;
    Region r;
  };
  Static statics[64];
  int nstatics = 0;
  size_t arena_used = 0;
  bool failed = false;
  int kind = kOk;
  std::string msg;
  uint64_t rng = 0;
  bool profile = false;
  uint64_t prof[32][kNumCounters];

  Worker() : shadow(kMaxThreadgroupMemory) {
    for (auto& s : shadow) s = TgShadow{kNone, kNone, 0, 0, 0, 0, 0, 0};
    for (auto& e : sg_epoch) e = 1;
  }
  ~Worker() {
    for (auto& t : threads)
      if (t.stack) munmap(t.stack, stack_size);
  }
};

inline Worker*& tl_worker_ptr() {
  static thread_local Worker* w = nullptr;
  return w;
}
inline Worker& worker() { return *tl_worker_ptr(); }

inline size_t fiber_stack_size() {
  static size_t s = [] {
    const char* e = std::getenv("JAX_MFA_EMU_STACK_KB");
    size_t kb = e ? size_t(std::atoll(e)) : 256;
    if (kb < 32) kb = 32;
    return kb * 1024;
  }();
  return s;
}

// Human-readable thread description.
inline std::string describe_thread(const Worker& w, int tid) {
  const ThreadArgs& a = w.threads[tid].args;
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread %d (position in threadgroup (%u,%u,%u), simdgroup %u lane %u)", tid,
                a.pos_tg.x, a.pos_tg.y, a.pos_tg.z, a.sg_index, a.lane);
  return buf;
}
inline std::string describe_region(const Region& r) {
  char buf[96];
  if (r.space == kThreadgroupSpace) {
    if (r.index >= 0) std::snprintf(buf, sizeof buf, "threadgroup(%d) region", r.index);
    else std::snprintf(buf, sizeof buf, "kernel-scope threadgroup array");
  } else {
    std::snprintf(buf, sizeof buf, "buffer(%d)", r.index);
  }
  return buf;
}

[[noreturn]] inline void yield_forever(Worker& w);

// Records an error for the current threadgroup and abandons its fibers.
[[noreturn]] inline void fail(int kind, const std::string& what) {
  Worker& w = worker();
  if (!w.failed) {
    w.failed = true;
    w.kind = kind;
    char head[256];
    std::snprintf(head, sizeof head, "kernel '%s', threadgroup (%u,%u,%u): ", w.d->k->name.c_str(), w.tgid.x,
                  w.tgid.y, w.tgid.z);
    w.msg = head + what;
  }
  yield_forever(w);
}

inline void yield(Worker& w) {
#if defined(JAX_MFA_EMU_UCONTEXT)
  swapcontext(&w.threads[w.cur].uc, &w.sched_uc);
#else
  fiber_switch(&w.threads[w.cur].sp, w.sched_sp);
#endif
}
[[noreturn]] inline void yield_forever(Worker& w) {
  w.threads[w.cur].state = kDone;
  for (;;) yield(w);
}

// ---------------------------------------------------------------------------
// Checkers.
inline bool tg_synced(const Worker& w, uint32_t ep, int rec_sg, uint32_t sgep, int my_sg) {
  return ep < w.tg_epoch || (rec_sg == my_sg && sgep < w.sg_epoch[my_sg]);
}

inline void report_race(Worker& w, const Region& r, size_t off, int tid, int other, bool write, bool other_write) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "threadgroup memory race at byte %zu of the %s: %s by %s conflicts with an earlier %s by %s "
                "with no threadgroup_barrier(mem_flags::mem_threadgroup) in between",
                off, describe_region(r).c_str(), write ? "write" : "read", describe_thread(w, tid).c_str(),
                other_write ? "write" : "read",
                other == kMany ? "several other threads" : describe_thread(w, other).c_str());
  fail(kRace, buf);
}

inline void race_check(Worker& w, const Region& r, const char* c, size_t n, bool write, int tid) {
  const size_t base = size_t(c - w.arena);
  const int sg = tid / 32;
  const uint32_t ep = w.tg_epoch, sgep = w.sg_epoch[sg];
  for (size_t i = 0; i < n; ++i) {
    TgShadow& s = w.shadow[base + i];
    if (s.w_tid != kNone && s.w_tid != tid && !tg_synced(w, s.w_ep, s.w_tid / 32, s.w_sgep, sg))
      report_race(w, r, size_t(c - r.base) + i, tid, s.w_tid, write, true);
    if (write) {
      if (s.r_tid != kNone && s.r_tid != tid && !tg_synced(w, s.r_ep, s.r_sg, s.r_sgep, sg))
        report_race(w, r, size_t(c - r.base) + i, tid, s.r_tid, true, false);
      s.w_tid = uint16_t(tid);
      s.w_ep = ep;
      s.w_sgep = sgep;
      s.r_tid = kNone;
    } else {
      if (s.r_tid == kNone || s.r_tid == tid || tg_synced(w, s.r_ep, s.r_sg, s.r_sgep, sg)) {
        if (s.r_tid != tid || s.r_ep != ep) {
          s.r_tid = uint16_t(tid);
          s.r_sg = uint16_t(sg);
        }
      } else {
        s.r_tid = kMany;
        if (s.r_sg != sg) s.r_sg = kNone;
      }
      s.r_ep = ep;
      s.r_sgep = sgep;
    }
  }
}

// Device memory: a byte written by one threadgroup must not be written or
// read by another threadgroup of the same dispatch (no atomics); within a
// threadgroup, a byte written by one thread must not be written or read by
// another thread without threadgroup_barrier(mem_flags::mem_device) between.
inline void owner_check(Worker& w, const Region& r, const char* c, size_t n, bool write, int tid) {
  const uint64_t me_group = w.group_linear + 1;
  const uint64_t ep = w.dev_epoch & 0x1FFFFFu;
  const uint64_t mine = (me_group << 32) | (uint64_t(tid) << 21) | ep;
  const size_t base = size_t(c - r.base);
  for (size_t i = 0; i < n; ++i) {
    std::atomic<uint64_t>& o = r.owner[base + i];
    uint64_t v = o.load(std::memory_order_relaxed);
    if (v == mine) continue;
    if (v == 0) {
      if (!write || o.compare_exchange_strong(v, mine, std::memory_order_relaxed)) continue;
    }
    const uint64_t g_other = v >> 32;
    const int t_other = int((v >> 21) & 0x7FF);
    if (g_other != me_group) {
      const uint3 g = w.d->grid;
      const uint64_t other = g_other - 1;
      char buf[500];
      std::snprintf(buf, sizeof buf,
                    "device memory conflict between threadgroups at byte %zu of %s: %s of this threadgroup %s an "
                    "element that threadgroup (%u,%u,%u) writes in the same dispatch (without atomics)",
                    base + i, describe_region(r).c_str(), describe_thread(w, tid).c_str(),
                    write ? "writes" : "reads", unsigned(other % g.x), unsigned((other / g.x) % g.y),
                    unsigned(other / (uint64_t(g.x) * g.y)));
      fail(kWriteConflict, buf);
    }
    if (t_other != tid && (v & 0x1FFFFFu) == ep) {
      char buf[500];
      std::snprintf(buf, sizeof buf,
                    "device memory race at byte %zu of %s: %s by %s conflicts with an earlier write by %s with no "
                    "threadgroup_barrier(mem_flags::mem_device) in between",
                    base + i, describe_region(r).c_str(), write ? "write" : "read", describe_thread(w, tid).c_str(),
                    describe_thread(w, t_other).c_str());
      fail(kRace, buf);
    }
    if (write) o.store(mine, std::memory_order_relaxed);
  }
}

[[noreturn]] __attribute__((noinline)) inline void report_oob(const char* c, size_t n, const Region* r, bool write,
                                                                int tid) {
  Worker& w = worker();
  if (tid < 0) tid = w.cur;
  char buf[400];
  const long long off = (long long)(c - r->base);
  if (r->absent)
    std::snprintf(buf, sizeof buf, "%s of %zu bytes at byte offset %lld of %s, which is absent (%s), by %s",
                  write ? "write" : "read", n, off, describe_region(*r).c_str(), r->absent,
                  describe_thread(w, tid).c_str());
  else
    std::snprintf(buf, sizeof buf, "out-of-bounds %s of %zu bytes at byte offset %lld of %s (%zu bytes) by %s",
                  write ? "write" : "read", n, off, describe_region(*r).c_str(), r->size,
                  describe_thread(w, tid).c_str());
  fail(r->space == kThreadgroupSpace ? kThreadgroupMemory : kOutOfBounds, buf);
}

__attribute__((noinline)) inline void shadow_check(const char* c, size_t n, const Region* r, bool write, int tid) {
  Worker& w = worker();
  if (tid < 0) tid = w.cur;
  if (r->space == kThreadgroupSpace) race_check(w, *r, c, n, write, tid);
  else owner_check(w, *r, c, n, write, tid);
}

// Every load/store through a checked pointer goes through here; r is null
// when neither checking nor profiling.
inline void check_access(const void* p, size_t n, const Region* r, bool write, int tid) {
  if (!r || !r->checked) return;
  const char* c = static_cast<const char*>(p);
  if (__builtin_expect(c < r->base || c + n > r->base + r->size || c + n < c || (write && r->absent), 0))
    report_oob(c, n, r, write, tid);
  if (r->space == kThreadgroupSpace || r->owner) shadow_check(c, n, r, write, tid);
}
inline void access(const void* p, size_t n, const Region* r, bool write, int tid) {
  if (!r) return;
  if (r->profile) count_access(r->space, n, write, tid);
  check_access(p, n, r, write, tid);
}
// One load or store instruction of the running lane through a pointer (an
// element, a vector or a struct, whatever its width): its bytes, and one
// device_accesses / threadgroup_accesses.
inline void access_instruction(const void* p, size_t n, const Region* r, bool write) {
  if (!r) return;
  if (r->profile && r->space != kConstantSpace)
    count(r->space == kThreadgroupSpace ? kCount_threadgroup_accesses : kCount_device_accesses, 1, -1);
  access(p, n, r, write, -1);
}
inline void count(int counter, uint64_t v, int tid) {
  Worker* w = tl_worker_ptr();
  if (!w || !w->profile) return;
  w->prof[(tid < 0 ? w->cur : tid) / 32][counter] += v;
}
inline void count_access(int space, size_t n, bool write, int tid) {
  const int c = space == kThreadgroupSpace ? (write ? kCount_threadgroup_bytes_written : kCount_threadgroup_bytes_read)
                : space == kConstantSpace  ? kCount_constant_bytes_read
                : write                    ? kCount_device_bytes_written
                                           : kCount_device_bytes_read;
  count(c, n, tid);
}
// A special-function call by the running lane (math functions of metal_compat.h).
inline void count_special(int counter) {
  if (profiling_dispatches().load(std::memory_order_relaxed) != 0) count(counter, 1, -1);
}
inline const FunctionConstantValue* find_function_constant(int index, const char* name, bool required) {
  Worker* w = tl_worker_ptr();
  if (!w || !w->d) return nullptr;  // outside a dispatch
  for (const auto& v : w->d->function_constants)
    if (v.index == index) return &v;
  if (required) {
    char buf[300];
    std::snprintf(buf, sizeof buf,
                  "function constant '%s' [[function_constant(%d)]] is read but has no value in this dispatch "
                  "(pass function_constants={...})",
                  name, index);
    fail(kInvalid, buf);
  }
  return nullptr;
}
inline void access_atomic(const void* p, size_t n, const Region* r) {
  if (!r) return;
  const char* c = static_cast<const char*>(p);
  if (c < r->base || c + n > r->base + r->size) {
    Worker& w = worker();
    char buf[300];
    std::snprintf(buf, sizeof buf, "out-of-bounds atomic access at byte offset %lld of %s by %s",
                  (long long)(c - r->base), describe_region(*r).c_str(), describe_thread(w, w.cur).c_str());
    fail(r->space == kThreadgroupSpace ? kThreadgroupMemory : kOutOfBounds, buf);
  }
}

// ---------------------------------------------------------------------------
// Rendezvous.
enum MemFlagBits : int { kMemNone = 0, kMemDevice = 1, kMemThreadgroup = 2, kMemTexture = 4 };

inline void threadgroup_barrier_impl(int flags, Site site) {
  Worker& w = worker();
  FiberThread& t = w.threads[w.cur];
  if (w.done > 0) {
    char buf[400];
    std::snprintf(buf, sizeof buf,
                  "barrier divergence: %s reached threadgroup_barrier at %s:%d but %d thread(s) of the threadgroup "
                  "have already returned",
                  describe_thread(w, w.cur).c_str(), site.file, site.line, w.done);
    fail(kDivergence, buf);
  }
  if (w.barrier_arrived == 0) {
    w.barrier_site = site;
    w.barrier_flags = flags;
  } else if (w.barrier_site != site) {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "barrier divergence: %s reached threadgroup_barrier at %s:%d while %d other thread(s) wait at the "
                  "threadgroup_barrier at %s:%d",
                  describe_thread(w, w.cur).c_str(), site.file, site.line, w.barrier_arrived, w.barrier_site.file,
                  w.barrier_site.line);
    fail(kDivergence, buf);
  }
  if (++w.barrier_arrived == w.n) {
    w.barrier_arrived = 0;
    if (w.profile)
      for (int sgi = 0; sgi < (w.n + 31) / 32; ++sgi) ++w.prof[sgi][kCount_threadgroup_barriers];
    for (int i = 0; i < w.n; ++i)
      if (w.threads[i].state == kAtBarrier) w.threads[i].state = kReady;
    if (flags & kMemThreadgroup) ++w.tg_epoch;
    if (flags & kMemDevice) ++w.dev_epoch;
    return;
  }
  t.state = kAtBarrier;
  t.site = site;
  yield(w);
}

// A SIMD-group collective: every active lane of the simdgroup must call the same
// collective at the same call site. The last lane to arrive runs `compute` over
// the lanes' posted data (nullptr for inactive lanes) while the others wait.
template <class F>
inline void collective(int op, const char* what, Site site, void* mine, F&& compute) {
  Worker& w = worker();
  FiberThread& t = w.threads[w.cur];
  const int sgi = w.cur / 32, lane = w.cur % 32;
  SgSlot& s = w.sg[sgi];
  if (s.arrived == 0) {
    s.op = op;
    s.site = site;
    s.what = what;
  } else if (s.op != op || s.site != site) {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "SIMD-group divergence: %s called %s at %s:%d while %d other lane(s) of its simdgroup wait in %s "
                  "at %s:%d",
                  describe_thread(w, w.cur).c_str(), what, site.file, site.line, s.arrived, s.what, s.site.file,
                  s.site.line);
    fail(kDivergence, buf);
  }
  s.data[lane] = mine;
  if (++s.arrived == s.nactive) {
    compute(s.data, s.nactive, sgi);
    s.arrived = 0;
    for (int l = 0; l < s.nactive; ++l) {
      FiberThread& o = w.threads[sgi * 32 + l];
      if (o.state == kAtCollective) o.state = kReady;
      s.data[l] = nullptr;
    }
    return;
  }
  t.state = kAtCollective;
  t.site = site;
  t.what = what;
  yield(w);
}

// Kernel-scope `threadgroup T name[N];`: one allocation per threadgroup, shared
// by all of its threads (keyed by the declaration's address).
template <class T>
inline threadgroup_ptr<T> tg_array(size_t count, const void* uid) {
  Worker& w = worker();
  for (int i = 0; i < w.nstatics; ++i)
    if (w.statics[i].uid == uid) return threadgroup_ptr<T>(reinterpret_cast<T*>(w.statics[i].r.base), &w.statics[i].r);
  const size_t off = (w.arena_used + 15) & ~size_t(15);
  const size_t bytes = count * sizeof(T);
  if (w.nstatics == 64 || off + bytes > kMaxThreadgroupMemory) {
    char buf[300];
    std::snprintf(buf, sizeof buf,
                  "threadgroup memory over Metal's 32 KiB limit: a kernel-scope threadgroup array of %zu bytes "
                  "needs bytes [%zu, %zu) (dynamic [[threadgroup(n)]] lengths take %zu bytes)",
                  bytes, off, off + bytes, w.d->tg_dynamic);
    fail(kThreadgroupMemory, buf);
  }
  w.arena_used = off + bytes;
  Worker::Static& s = w.statics[w.nstatics++];
  s.uid = uid;
  s.r.base = w.arena + off;
  s.r.size = bytes;
  s.r.index = -1;
  s.r.space = kThreadgroupSpace;
  s.r.checked = w.d->check;
  s.r.profile = w.d->profile;
  return threadgroup_ptr<T>(reinterpret_cast<T*>(s.r.base), w.d->check || w.d->profile ? &s.r : nullptr);
}

// ---------------------------------------------------------------------------
// Running one threadgroup on the calling OS thread.
inline void fiber_main(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  w.d->k->run(*w.d->k, w.threads[w.cur].args);
  // Returned from the kernel.
  const int sgi = w.cur / 32;
  ++w.done;
  if (w.barrier_arrived > 0) {
    char buf[400];
    std::snprintf(buf, sizeof buf,
                  "barrier divergence: %s returned while %d thread(s) wait at the threadgroup_barrier at %s:%d",
                  describe_thread(w, w.cur).c_str(), w.barrier_arrived, w.barrier_site.file, w.barrier_site.line);
    fail(kDivergence, buf);
  }
  if (w.sg[sgi].arrived > 0) {
    char buf[400];
    std::snprintf(buf, sizeof buf, "SIMD-group divergence: %s returned while %d lane(s) wait in %s at %s:%d",
                  describe_thread(w, w.cur).c_str(), w.sg[sgi].arrived, w.sg[sgi].what, w.sg[sgi].site.file,
                  w.sg[sgi].site.line);
    fail(kDivergence, buf);
  }
  w.threads[w.cur].state = kDone;
  for (;;) yield(w);
}

#if defined(JAX_MFA_EMU_UCONTEXT)
inline void fiber_main_uc(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<void*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

inline uint64_t next_rand(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

inline void deadlock_report(Worker& w) {
  std::string m = "divergence (deadlock): no thread can proceed;";
  int shown = 0;
  for (int i = 0; i < w.n && shown < 6; ++i) {
    const FiberThread& t = w.threads[i];
    if (t.state == kAtBarrier || t.state == kAtCollective) {
      char buf[300];
      std::snprintf(buf, sizeof buf, " %s waits in %s at %s:%d;", describe_thread(w, i).c_str(),
                    t.state == kAtBarrier ? "threadgroup_barrier" : t.what, t.site.file, t.site.line);
      m += buf;
      ++shown;
    }
  }
  char buf[100];
  std::snprintf(buf, sizeof buf, " %d thread(s) returned", w.done);
  m += buf;
  w.cur = 0;
  if (!w.failed) {
    w.failed = true;
    w.kind = kDivergence;
    char head[256];
    std::snprintf(head, sizeof head, "kernel '%s', threadgroup (%u,%u,%u): ", w.d->k->name.c_str(), w.tgid.x,
                  w.tgid.y, w.tgid.z);
    w.msg = head + m;
  }
}

inline void merge_profile(Worker& w, Dispatch& d, int nsg) {
  std::lock_guard<std::mutex> l(d.mu);
  if (int(d.prof_per_sg.size()) < nsg) d.prof_per_sg.resize(nsg, std::array<uint64_t, kNumCounters>{});
  for (int s = 0; s < nsg; ++s)
    for (int c = 0; c < kNumCounters; ++c) {
      d.prof_per_sg[s][c] += w.prof[s][c];
      d.prof_max[c] = std::max(d.prof_max[c], w.prof[s][c]);
    }
  d.prof_tg_memory = std::max(d.prof_tg_memory, w.arena_used);
}

inline void run_group(Worker& w, Dispatch& d, uint64_t gi) {
  w.d = &d;
  w.group_linear = gi;
  w.tgid = uint3(uint(gi % d.grid.x), uint((gi / d.grid.x) % d.grid.y), uint(gi / (uint64_t(d.grid.x) * d.grid.y)));
  const int n = d.nthreads;
  w.n = n;
  w.failed = false;
  w.kind = kOk;
  w.barrier_arrived = 0;
  w.done = 0;
  ++w.tg_epoch;  // all shadow records of earlier threadgroups count as synchronized
  ++w.dev_epoch;
  const int nsg = (n + 31) / 32;
  for (int s = 0; s < nsg; ++s) {
    w.sg[s].arrived = 0;
    w.sg[s].nactive = std::min(32, n - s * 32);
    for (auto& p : w.sg[s].data) p = nullptr;
  }
  // Threadgroup memory: regions first, then kernel-scope arrays. Filled with
  // 0xFF bytes (NaN for floating-point types) as it is undefined in Metal.
  std::memset(w.arena, 0xFF, kMaxThreadgroupMemory);
  w.profile = d.profile;
  if (d.profile) std::memset(w.prof, 0, sizeof w.prof);
  w.tg = d.tg;
  size_t off = 0;
  for (auto& r : w.tg) {
    r.base = w.arena + off;
    off += r.size;
  }
  w.arena_used = off;
  w.nstatics = 0;
  // Fibers.
  const size_t ss = fiber_stack_size();
  if (w.stack_size != ss) {
    for (auto& t : w.threads)
      if (t.stack) munmap(t.stack, w.stack_size), t.stack = nullptr;
    w.stack_size = ss;
  }
  if (int(w.threads.size()) < n) w.threads.resize(n);
  const uint3 tp = d.threads;
  for (int i = 0; i < n; ++i) {
    FiberThread& t = w.threads[i];
    if (!t.stack) {
      void* m = mmap(nullptr, ss, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) {
        std::fprintf(stderr, "jax_mfa metal emulator: cannot allocate fiber stacks\n");
        std::abort();
      }
      mprotect(m, 4096, PROT_NONE);  // guard page
      t.stack = static_cast<char*>(m);
    }
    t.state = kReady;
    ThreadArgs& a = t.args;
    a.pos_tg = uint3(uint(i % tp.x), uint((i / tp.x) % tp.y), uint(i / (tp.x * tp.y)));
    a.tg_pos = w.tgid;
    a.tptg = tp;
    a.tgpg = d.grid;
    a.tpg = uint3(d.grid.x * tp.x, d.grid.y * tp.y, d.grid.z * tp.z);
    a.pos_grid = uint3(w.tgid.x * tp.x + a.pos_tg.x, w.tgid.y * tp.y + a.pos_tg.y, w.tgid.z * tp.z + a.pos_tg.z);
    a.index_tg = uint(i);
    a.sg_index = uint(i / 32);
    a.lane = uint(i % 32);
    a.sgptg = uint(nsg);
    a.bufs = d.bufs.data();
    a.tg = w.tg.data();
    a.attach = d.check || d.profile;
#if defined(JAX_MFA_EMU_UCONTEXT)
    getcontext(&t.uc);
    t.uc.uc_stack.ss_sp = t.stack + 4096;
    t.uc.uc_stack.ss_size = ss - 4096;
    t.uc.uc_link = nullptr;
    const uintptr_t wp = reinterpret_cast<uintptr_t>(&w);
    makecontext(&t.uc, (void (*)())fiber_main_uc, 2, unsigned(wp & 0xffffffffu), unsigned(wp >> 32));
#else
    t.sp = fiber_init_stack(t.stack + ss, &fiber_main, &w);
#endif
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  w.rng = d.has_seed ? (d.seed * 0x9E3779B97F4A7C15ull) ^ (gi + 1) * 0xD1B54A32D192ED03ull : 0;
  if (w.rng == 0 && d.has_seed) w.rng = 1;
  for (;;) {
    if (d.has_seed)
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[int(next_rand(w.rng) % uint64_t(i + 1))]);
    bool progress = false;
    for (int k = 0; k < n; ++k) {
      const int i = order[k];
      if (w.threads[i].state != kReady) continue;
      w.cur = i;
#if defined(JAX_MFA_EMU_UCONTEXT)
      swapcontext(&w.sched_uc, &w.threads[i].uc);
#else
      fiber_switch(&w.sched_sp, w.threads[i].sp);
#endif
      if (w.failed) return;
      progress = true;
    }
    if (w.done == n) {
      if (d.profile) merge_profile(w, d, nsg);
      return;
    }
    if (!progress) {
      deadlock_report(w);
      return;
    }
  }
}

}  // namespace detail
}  // namespace metal

#pragma GCC visibility pop
