// The Metal Shading Language library subset of the Metal emulator: math,
// SIMD-group functions, simdgroup_matrix, barriers, atomics and limits.
// Included through <metal_stdlib>.
#pragma once

#include <cfloat>
#include <limits>

#include "metal_emulator/core.h"

// Hidden visibility: every shared object gets its own registry, workers and
// statics (default-visibility inline statics would be merged process-wide).
#pragma GCC visibility push(hidden)

namespace metal {

// ---------------------------------------------------------------------------
// Constants and limits.
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif
#ifndef NAN
#define NAN (__builtin_nanf(""))
#endif
#ifndef HUGE_VALF
#define HUGE_VALF (__builtin_huge_valf())
#endif
#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#define HUGE_VALH (::metal::half(__builtin_inff()))
#define MAXHALF (::metal::half(65504.0f))
#define HALF_MAX (::metal::half(65504.0f))
#ifndef M_E_F
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f
#endif

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
#define JAX_MFA_EMU_LIMITS(H, MAXB, MINB, LOWB, EPSB, INFB, NANB, DIG)                    \
  template <>                                                                             \
  struct numeric_limits<H> {                                                              \
    static constexpr bool is_specialized = true, is_signed = true, is_integer = false;    \
    static constexpr bool has_infinity = true, has_quiet_NaN = true;                      \
    static constexpr int digits = DIG;                                                    \
    static constexpr H max() { return H(detail::from_bits_t{}, MAXB); }                   \
    static constexpr H min() { return H(detail::from_bits_t{}, MINB); }                   \
    static constexpr H lowest() { return H(detail::from_bits_t{}, LOWB); }                \
    static constexpr H epsilon() { return H(detail::from_bits_t{}, EPSB); }               \
    static constexpr H infinity() { return H(detail::from_bits_t{}, INFB); }              \
    static constexpr H quiet_NaN() { return H(detail::from_bits_t{}, NANB); }             \
  };
JAX_MFA_EMU_LIMITS(half, 0x7bff, 0x0400, 0xfbff, 0x1400, 0x7c00, 0x7e00, 11)
JAX_MFA_EMU_LIMITS(bfloat, 0x7f7f, 0x0080, 0xff7f, 0x3c00, 0x7f80, 0x7fc0, 8)
#undef JAX_MFA_EMU_LIMITS

// Metal's type traits (<metal_type_traits>); half and bfloat count as
// floating-point types. Address spaces are not types here, so
// remove_addrspace is the identity.
using std::add_const;
using std::add_const_t;
using std::add_pointer_t;
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::declval;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_const;
using std::is_const_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_enum;
using std::is_integral;
using std::is_integral_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_same;
using std::is_same_v;
using std::is_signed_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::is_void;
using std::is_void_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_pointer;
using std::remove_pointer_t;
using std::remove_reference;
using std::remove_reference_t;
using std::remove_volatile;
using std::remove_volatile_t;
using std::true_type;
template <class T>
struct is_floating_point
    : bool_constant<std::is_floating_point<T>::value || is_emu_float16<std::remove_cv_t<T>>::value> {};
template <class T>
constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T>
struct is_arithmetic : bool_constant<std::is_integral<T>::value || is_floating_point<T>::value> {};
template <class T>
constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T>
struct is_scalar : bool_constant<std::is_scalar<T>::value || is_floating_point<T>::value> {};
template <class T>
constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T>
struct is_signed : bool_constant<std::is_signed<T>::value || is_floating_point<T>::value> {};
template <class T>
struct remove_addrspace {
  using type = T;
};
template <class T>
using remove_addrspace_t = typename remove_addrspace<T>::type;

template <class T>
struct unref { using type = T; };
template <class T, int S>
struct unref<as_ref<T, S>> { using type = std::remove_cv_t<T>; };
template <class T>
using unref_t = typename unref<T>::type;

template <class T, class U>
inline T as_type(const U& uu) {
  const unref_t<U> u = uu;
  static_assert(sizeof(T) == sizeof(unref_t<U>), "as_type needs types of the same size");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

// ---------------------------------------------------------------------------
// Math. Functions are declared in metal and brought into metal::fast and
// metal::precise by using-declarations, so headers may add overloads to any
// of the three (as MLX's bf16_math.h does for bfloat). All are computed with
// the host's precise float library (Metal's fast-math results may differ by
// a few ulp). The bfloat overloads are templates, so that a non-template
// overload declared by such a header wins. Special functions are counted in
// the profile (per lane call), from their float overload.
#define JAX_MFA_EMU_BF(R) template <class B, std::enable_if_t<std::is_same<B, bfloat>::value, int> = 0> inline R
#define JAX_MFA_EMU_COUNT(NAME) detail::count_special(detail::kCount_##NAME);
#define JAX_MFA_EMU_NOCOUNT(NAME)

#define JAX_MFA_EMU_UNARY(NAME, COUNT, EXPR)                                              \
  inline float NAME(float x) {                                                            \
    COUNT(NAME)                                                                           \
    return EXPR;                                                                          \
  }                                                                                       \
  inline half NAME(half x) { return half(NAME(float(x))); }                               \
  JAX_MFA_EMU_BF(bfloat) NAME(B x) { return bfloat(NAME(float(x))); }                     \
  template <class T, int N>                                                               \
  inline vec<T, N> NAME(const vec<T, N>& v) {                                             \
    vec<T, N> r;                                                                          \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(v.v[i]);                                    \
    return r;                                                                             \
  }                                                                                       \
  template <class T, int S>                                                               \
  inline auto NAME(const as_ref<T, S>& x) { return NAME(x.get()); }
JAX_MFA_EMU_UNARY(exp, JAX_MFA_EMU_COUNT, __builtin_expf(x))
JAX_MFA_EMU_UNARY(exp2, JAX_MFA_EMU_COUNT, __builtin_exp2f(x))
JAX_MFA_EMU_UNARY(exp10, JAX_MFA_EMU_COUNT, __builtin_powf(10.0f, x))
JAX_MFA_EMU_UNARY(log, JAX_MFA_EMU_COUNT, __builtin_logf(x))
JAX_MFA_EMU_UNARY(log2, JAX_MFA_EMU_COUNT, __builtin_log2f(x))
JAX_MFA_EMU_UNARY(log10, JAX_MFA_EMU_COUNT, __builtin_log10f(x))
JAX_MFA_EMU_UNARY(sqrt, JAX_MFA_EMU_COUNT, __builtin_sqrtf(x))
JAX_MFA_EMU_UNARY(rsqrt, JAX_MFA_EMU_COUNT, 1.0f / __builtin_sqrtf(x))
JAX_MFA_EMU_UNARY(sin, JAX_MFA_EMU_COUNT, __builtin_sinf(x))
JAX_MFA_EMU_UNARY(cos, JAX_MFA_EMU_COUNT, __builtin_cosf(x))
JAX_MFA_EMU_UNARY(tan, JAX_MFA_EMU_COUNT, __builtin_tanf(x))
JAX_MFA_EMU_UNARY(sinh, JAX_MFA_EMU_COUNT, __builtin_sinhf(x))
JAX_MFA_EMU_UNARY(cosh, JAX_MFA_EMU_COUNT, __builtin_coshf(x))
JAX_MFA_EMU_UNARY(tanh, JAX_MFA_EMU_COUNT, __builtin_tanhf(x))
JAX_MFA_EMU_UNARY(asin, JAX_MFA_EMU_COUNT, __builtin_asinf(x))
JAX_MFA_EMU_UNARY(acos, JAX_MFA_EMU_COUNT, __builtin_acosf(x))
JAX_MFA_EMU_UNARY(atan, JAX_MFA_EMU_COUNT, __builtin_atanf(x))
JAX_MFA_EMU_UNARY(erf, JAX_MFA_EMU_COUNT, __builtin_erff(x))
JAX_MFA_EMU_UNARY(floor, JAX_MFA_EMU_NOCOUNT, __builtin_floorf(x))
JAX_MFA_EMU_UNARY(ceil, JAX_MFA_EMU_NOCOUNT, __builtin_ceilf(x))
JAX_MFA_EMU_UNARY(round, JAX_MFA_EMU_NOCOUNT, __builtin_roundf(x))
JAX_MFA_EMU_UNARY(trunc, JAX_MFA_EMU_NOCOUNT, __builtin_truncf(x))
JAX_MFA_EMU_UNARY(rint, JAX_MFA_EMU_NOCOUNT, __builtin_rintf(x))
JAX_MFA_EMU_UNARY(fabs, JAX_MFA_EMU_NOCOUNT, __builtin_fabsf(x))
JAX_MFA_EMU_UNARY(fract, JAX_MFA_EMU_NOCOUNT, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
JAX_MFA_EMU_UNARY(saturate, JAX_MFA_EMU_NOCOUNT, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
JAX_MFA_EMU_UNARY(sign, JAX_MFA_EMU_NOCOUNT, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f * x : 0.0f)))
#undef JAX_MFA_EMU_UNARY

inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(detail::from_bits_t{}, uint16_t(x.bits & 0x7fffu)); }
JAX_MFA_EMU_BF(bfloat) abs(B x) { return bfloat(detail::from_bits_t{}, uint16_t(x.bits & 0x7fffu)); }
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
inline I abs(I x) { return x < 0 ? I(-x) : x; }
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = abs(v.v[i]);
  return r;
}

#define JAX_MFA_EMU_PRED(NAME, EXPR)                                        \
  inline bool NAME(float x) { return EXPR; }                                \
  inline bool NAME(half x) { return NAME(float(x)); }                       \
  inline bool NAME(bfloat x) { return NAME(float(x)); }                     \
  template <class T, int N>                                                 \
  inline vec<bool, N> NAME(const vec<T, N>& v) {                            \
    vec<bool, N> r;                                                         \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(v.v[i]);                      \
    return r;                                                               \
  }
JAX_MFA_EMU_PRED(isnan, __builtin_isnan(x))
JAX_MFA_EMU_PRED(isinf, __builtin_isinf(x))
JAX_MFA_EMU_PRED(isfinite, __builtin_isfinite(x))
JAX_MFA_EMU_PRED(signbit, __builtin_signbit(x))
#undef JAX_MFA_EMU_PRED

// Binary functions: one non-template overload per scalar type (so implicit
// conversions resolve as in Metal), element-wise on vectors, vector-scalar.
#define JAX_MFA_EMU_BINARY_F(NAME, COUNT, EXPR)                                                \
  inline float NAME(float x, float y) {                                                        \
    COUNT(NAME)                                                                                \
    return EXPR;                                                                               \
  }                                                                                            \
  inline half NAME(half x, half y) { return half(NAME(float(x), float(y))); }                  \
  JAX_MFA_EMU_BF(bfloat) NAME(B x, B y) { return bfloat(NAME(float(x), float(y))); }
#define JAX_MFA_EMU_BINARY_I(NAME, T, EXPR) \
  inline T NAME(T x, T y) { return EXPR; }
#define JAX_MFA_EMU_BINARY_V(NAME)                                                                \
  template <class T, int N>                                                                       \
  inline vec<T, N> NAME(const vec<T, N>& a, const vec<T, N>& b) {                                 \
    vec<T, N> r;                                                                                  \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(a.v[i], b.v[i]);                                    \
    return r;                                                                                     \
  }                                                                                               \
  template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>         \
  inline vec<T, N> NAME(const vec<T, N>& a, U b) {                                                \
    return NAME(a, vec<T, N>(b));                                                                 \
  }
JAX_MFA_EMU_BINARY_F(fmax, JAX_MFA_EMU_NOCOUNT, __builtin_fmaxf(x, y))
JAX_MFA_EMU_BINARY_F(fmin, JAX_MFA_EMU_NOCOUNT, __builtin_fminf(x, y))
JAX_MFA_EMU_BINARY_F(max, JAX_MFA_EMU_NOCOUNT, __builtin_fmaxf(x, y))
JAX_MFA_EMU_BINARY_F(min, JAX_MFA_EMU_NOCOUNT, __builtin_fminf(x, y))
JAX_MFA_EMU_BINARY_F(pow, JAX_MFA_EMU_COUNT, __builtin_powf(x, y))
JAX_MFA_EMU_BINARY_F(powr, JAX_MFA_EMU_COUNT, __builtin_powf(x, y))
JAX_MFA_EMU_BINARY_F(fmod, JAX_MFA_EMU_NOCOUNT, __builtin_fmodf(x, y))
JAX_MFA_EMU_BINARY_F(copysign, JAX_MFA_EMU_NOCOUNT, __builtin_copysignf(x, y))
JAX_MFA_EMU_BINARY_F(atan2, JAX_MFA_EMU_COUNT, __builtin_atan2f(x, y))
JAX_MFA_EMU_BINARY_F(step, JAX_MFA_EMU_NOCOUNT, y < x ? 0.0f : 1.0f)
#define JAX_MFA_EMU_INT_MINMAX(T)                  \
  JAX_MFA_EMU_BINARY_I(max, T, x > y ? x : y)      \
  JAX_MFA_EMU_BINARY_I(min, T, x < y ? x : y)
JAX_MFA_EMU_INT_MINMAX(char)
JAX_MFA_EMU_INT_MINMAX(uchar)
JAX_MFA_EMU_INT_MINMAX(short)
JAX_MFA_EMU_INT_MINMAX(ushort)
JAX_MFA_EMU_INT_MINMAX(int)
JAX_MFA_EMU_INT_MINMAX(uint)
JAX_MFA_EMU_INT_MINMAX(long)
JAX_MFA_EMU_INT_MINMAX(ulong)
#undef JAX_MFA_EMU_INT_MINMAX
JAX_MFA_EMU_BINARY_V(fmax)
JAX_MFA_EMU_BINARY_V(fmin)
JAX_MFA_EMU_BINARY_V(max)
JAX_MFA_EMU_BINARY_V(min)
JAX_MFA_EMU_BINARY_V(pow)
JAX_MFA_EMU_BINARY_V(powr)
JAX_MFA_EMU_BINARY_V(fmod)
JAX_MFA_EMU_BINARY_V(copysign)
JAX_MFA_EMU_BINARY_V(atan2)
JAX_MFA_EMU_BINARY_V(step)
#undef JAX_MFA_EMU_BINARY_F
#undef JAX_MFA_EMU_BINARY_I
#undef JAX_MFA_EMU_BINARY_V

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
JAX_MFA_EMU_BF(bfloat) fma(B a, B b, B c) { return bfloat(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, int N>
inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = fma(a.v[i], b.v[i], c.v[i]);
  return r;
}

template <class T, std::enable_if_t<is_emu_scalar<T>::value, int> = 0>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, int N>
inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = clamp(x.v[i], lo.v[i], hi.v[i]);
  return r;
}
template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>
inline vec<T, N> clamp(const vec<T, N>& x, U lo, U hi) { return clamp(x, vec<T, N>(lo), vec<T, N>(hi)); }

inline float mix(float x, float y, float a) { return x + (y - x) * a; }
inline half mix(half x, half y, half a) { return half(mix(float(x), float(y), float(a))); }
template <class T, int N>
inline vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = mix(x.v[i], y.v[i], a.v[i]);
  return r;
}
template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>
inline vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, U a) { return mix(x, y, vec<T, N>(a)); }

// select(a, b, c): c ? b : a (element-wise for vectors).
template <class T, std::enable_if_t<is_emu_scalar<T>::value, int> = 0>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = c.v[i] ? b.v[i] : a.v[i];
  return r;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) { return c ? b : a; }

template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s += float(a.v[i]) * float(b.v[i]);
  return T(s);
}

inline uint popcount(uint x) { return uint(__builtin_popcount(x)); }
inline uint clz(uint x) { return x ? uint(__builtin_clz(x)) : 32u; }
inline uint ctz(uint x) { return x ? uint(__builtin_ctz(x)) : 32u; }
inline uint mulhi(uint a, uint b) { return uint((uint64_t(a) * b) >> 32); }

template <class T>
inline auto divide(T a, T b) { return a / b; }

#undef JAX_MFA_EMU_COUNT
#undef JAX_MFA_EMU_NOCOUNT

#define JAX_MFA_EMU_MATH_NAMES(X)                                                                              \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sqrt) X(rsqrt) X(sin) X(cos) X(tan) X(sinh) X(cosh)        \
  X(tanh) X(asin) X(acos) X(atan) X(erf) X(floor) X(ceil) X(round) X(trunc) X(rint) X(fabs) X(fract)          \
  X(saturate) X(sign) X(abs) X(isnan) X(isinf) X(isfinite) X(signbit) X(fmax) X(fmin) X(max) X(min) X(pow)    \
  X(powr) X(fmod) X(copysign) X(atan2) X(step) X(fma) X(clamp) X(mix) X(select) X(dot) X(divide)
#define JAX_MFA_EMU_USING(NAME) using ::metal::NAME;
namespace fast {
JAX_MFA_EMU_MATH_NAMES(JAX_MFA_EMU_USING)
}
namespace precise {
JAX_MFA_EMU_MATH_NAMES(JAX_MFA_EMU_USING)
}
#undef JAX_MFA_EMU_USING
#undef JAX_MFA_EMU_MATH_NAMES

// ---------------------------------------------------------------------------
// Barriers.
enum class mem_flags : int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags flags, JAX_MFA_EMU_SITE_PARAMS) {
  detail::threadgroup_barrier_impl(int(flags), JAX_MFA_EMU_SITE);
}

namespace detail {
enum CollectiveOp : int {
  kOpSimdBarrier = 1,
  kOpShuffle,
  kOpShuffleXor,
  kOpShuffleUp,
  kOpShuffleDown,
  kOpBroadcast,
  kOpBroadcastFirst,
  kOpSum,
  kOpProduct,
  kOpMax,
  kOpMin,
  kOpPrefixExcl,
  kOpPrefixIncl,
  kOpAll,
  kOpAny,
  kOpMatLoad,
  kOpMatStore,
  kOpMatMulAcc,
  kOpMatMul,
  kOpShuffleFillUp,
  kOpShuffleFillDown,
  kOpAnd,
  kOpOr,
  kOpXor,
  kOpPrefixExclProduct,
  kOpPrefixInclProduct,
  kOpRotateUp,
  kOpRotateDown,
};
}  // namespace detail

// simdgroup_barrier: a rendezvous of the simdgroup's lanes; with
// mem_threadgroup it also orders threadgroup memory between those lanes.
inline void simdgroup_barrier(mem_flags flags, JAX_MFA_EMU_SITE_PARAMS) {
  int dummy = 0;
  const int f = int(flags);
  detail::collective(detail::kOpSimdBarrier, "simdgroup_barrier", JAX_MFA_EMU_SITE, &dummy,
                     [f](void**, int, int sgi) {
                       if (f & detail::kMemThreadgroup) ++detail::worker().sg_epoch[sgi];
                       detail::count(detail::kCount_simdgroup_barriers, 1, sgi * 32);
                     });
}

// ---------------------------------------------------------------------------
// SIMD-group functions (collectives over the active lanes of the simdgroup).
namespace detail {
template <class T>
struct LaneVal {
  T v;
  int arg;
  T out;
  T fill;          // simd_shuffle_and_fill_*: filling_data
  int modulo = 32;  // simd_shuffle_and_fill_*: width of the lane segments
};
template <class T>
inline T lane_shuffle(int op, const char* what, T v, int arg, Site site, T fill = T(), int modulo = 32) {
  LaneVal<T> d{v, arg, v, fill, modulo};
  collective(op, what, site, &d, [op](void** data, int n, int sgi) {
    count(kCount_simd_shuffles, 1, sgi * 32);
    for (int l = 0; l < n; ++l) {
      auto* me = static_cast<LaneVal<T>*>(data[l]);
      int src = l;
      bool from_fill = false;
      const int m = me->modulo, j = l % m;
      switch (op) {
        case kOpShuffle:
        case kOpBroadcast: src = me->arg; break;
        case kOpShuffleXor: src = l ^ me->arg; break;
        case kOpShuffleUp: src = l - me->arg; break;
        case kOpShuffleDown: src = l + me->arg; break;
        case kOpBroadcastFirst: src = 0; break;
        case kOpRotateUp: src = (l - me->arg % n + n) % n; break;
        case kOpRotateDown: src = (l + me->arg) % n; break;
        case kOpShuffleFillUp:  // lanes below delta in their segment take filling_data from its top
          from_fill = j < me->arg;
          src = from_fill ? l - me->arg + m : l - me->arg;
          break;
        case kOpShuffleFillDown:
          from_fill = j + me->arg >= m;
          src = from_fill ? l + me->arg - m : l + me->arg;
          break;
      }
      if (src >= 0 && src < 32 && data[src]) {
        const auto* other = static_cast<LaneVal<T>*>(data[src]);
        me->out = from_fill ? other->fill : other->v;
      } else if (op == kOpShuffleUp || op == kOpShuffleDown) {
        me->out = me->v;  // lanes with no source lane keep their value
      } else {
        me->out = T(0);  // reading an inactive lane: undefined in Metal
      }
    }
  });
  return d.out;
}
template <class T>
inline T combine(int op, const T& a, const T& b) {
  switch (op) {
    case kOpSum: return T(a + b);
    case kOpProduct: return T(a * b);
    case kOpMax: return max(a, b);
    case kOpMin: return min(a, b);
  }
  if constexpr (std::is_integral<T>::value) {  // simd_and/or/xor: integer types only in Metal
    switch (op) {
      case kOpAnd: return T(a & b);
      case kOpOr: return T(a | b);
      case kOpXor: return T(a ^ b);
    }
  }
  return a;
}
template <class T>
inline T lane_reduce(int op, const char* what, T v, Site site) {
  LaneVal<T> d{v, 0, v, v};
  collective(op, what, site, &d, [op](void** data, int n, int sgi) {
    count(kCount_simd_reductions, 1, sgi * 32);
    if (op == kOpPrefixExcl || op == kOpPrefixIncl || op == kOpPrefixExclProduct || op == kOpPrefixInclProduct) {
      const bool product = op == kOpPrefixExclProduct || op == kOpPrefixInclProduct;
      const bool inclusive = op == kOpPrefixIncl || op == kOpPrefixInclProduct;
      T acc = T(product ? 1 : 0);
      for (int l = 0; l < n; ++l) {
        auto* me = static_cast<LaneVal<T>*>(data[l]);
        if (inclusive) acc = T(product ? acc * me->v : acc + me->v);
        me->out = acc;
        if (!inclusive) acc = T(product ? acc * me->v : acc + me->v);
      }
      return;
    }
    // Pairwise tree over lanes (like a butterfly reduction).
    T vals[32];
    bool have[32];
    for (int l = 0; l < 32; ++l) {
      have[l] = l < n && data[l];
      if (have[l]) vals[l] = static_cast<LaneVal<T>*>(data[l])->v;
    }
    for (int step = 1; step < 32; step *= 2)
      for (int l = 0; l + step < 32; l += 2 * step) {
        if (have[l] && have[l + step]) vals[l] = combine(op, vals[l], vals[l + step]);
        else if (have[l + step]) vals[l] = vals[l + step], have[l] = true;
      }
    for (int l = 0; l < n; ++l) static_cast<LaneVal<T>*>(data[l])->out = vals[0];
  });
  return d.out;
}
}  // namespace detail

// SIMD-group shuffles and reductions: collectives of the 32 lanes, executed
// in lockstep by the runtime (the value is copied out of any proxy first).
#define JAX_MFA_EMU_SHUFFLE(NAME, OP, ARG, LANE_EXPR)                                   \
  template <class T0>                                                                  \
  inline unref_t<T0> NAME(T0 v0, ushort ARG, JAX_MFA_EMU_SITE_PARAMS) {                 \
    using T = unref_t<T0>;                                                             \
    const T v = v0;                                                                    \
    return detail::lane_shuffle<T>(detail::OP, #NAME, v, LANE_EXPR, JAX_MFA_EMU_SITE); \
  }
#define JAX_MFA_EMU_REDUCE(NAME, OP)                                         \
  template <class T0>                                                       \
  inline unref_t<T0> NAME(T0 v0, JAX_MFA_EMU_SITE_PARAMS) {                  \
    using T = unref_t<T0>;                                                  \
    const T v = v0;                                                         \
    return detail::lane_reduce<T>(detail::OP, #NAME, v, JAX_MFA_EMU_SITE);  \
  }
JAX_MFA_EMU_SHUFFLE(simd_shuffle, kOpShuffle, lane, lane)
JAX_MFA_EMU_SHUFFLE(simd_broadcast, kOpBroadcast, lane, lane)
template <class T0>
inline unref_t<T0> simd_broadcast_first(T0 v0, JAX_MFA_EMU_SITE_PARAMS) {
  using T = unref_t<T0>;
  const T v = v0;
  return detail::lane_shuffle<T>(detail::kOpBroadcastFirst, "simd_broadcast_first", v, 0, JAX_MFA_EMU_SITE);
}
JAX_MFA_EMU_SHUFFLE(simd_shuffle_xor, kOpShuffleXor, mask, mask & 31)
JAX_MFA_EMU_SHUFFLE(simd_shuffle_up, kOpShuffleUp, delta, delta)
JAX_MFA_EMU_SHUFFLE(simd_shuffle_down, kOpShuffleDown, delta, delta)
JAX_MFA_EMU_SHUFFLE(simd_shuffle_rotate_up, kOpRotateUp, delta, delta)
JAX_MFA_EMU_SHUFFLE(simd_shuffle_rotate_down, kOpRotateDown, delta, delta)
JAX_MFA_EMU_REDUCE(simd_sum, kOpSum)
JAX_MFA_EMU_REDUCE(simd_product, kOpProduct)
JAX_MFA_EMU_REDUCE(simd_max, kOpMax)
JAX_MFA_EMU_REDUCE(simd_min, kOpMin)
JAX_MFA_EMU_REDUCE(simd_prefix_exclusive_sum, kOpPrefixExcl)
JAX_MFA_EMU_REDUCE(simd_prefix_inclusive_sum, kOpPrefixIncl)
JAX_MFA_EMU_REDUCE(simd_prefix_exclusive_product, kOpPrefixExclProduct)
JAX_MFA_EMU_REDUCE(simd_prefix_inclusive_product, kOpPrefixInclProduct)
JAX_MFA_EMU_REDUCE(simd_and, kOpAnd)
JAX_MFA_EMU_REDUCE(simd_or, kOpOr)
JAX_MFA_EMU_REDUCE(simd_xor, kOpXor)
#undef JAX_MFA_EMU_SHUFFLE
#undef JAX_MFA_EMU_REDUCE
// simd_shuffle_and_fill_up/down(data, filling_data, delta[, modulo]) and
// simd_shuffle_rotate_up/down(data, delta).
#define JAX_MFA_EMU_SHUFFLE_FILL(NAME, OP)                                                                \
  template <class T0, class T1>                                                                          \
  inline unref_t<T0> NAME(T0 v0, T1 f0, ushort delta, ushort modulo, JAX_MFA_EMU_SITE_PARAMS) {           \
    using T = unref_t<T0>;                                                                               \
    const T v = v0, f = T(f0);                                                                           \
    return detail::lane_shuffle<T>(detail::OP, #NAME, v, delta, JAX_MFA_EMU_SITE, f, modulo ? modulo : 32); \
  }                                                                                                      \
  template <class T0, class T1>                                                                          \
  inline unref_t<T0> NAME(T0 v0, T1 f0, ushort delta, JAX_MFA_EMU_SITE_PARAMS) {                          \
    using T = unref_t<T0>;                                                                               \
    const T v = v0, f = T(f0);                                                                           \
    return detail::lane_shuffle<T>(detail::OP, #NAME, v, delta, JAX_MFA_EMU_SITE, f, 32);                \
  }
JAX_MFA_EMU_SHUFFLE_FILL(simd_shuffle_and_fill_up, kOpShuffleFillUp)
JAX_MFA_EMU_SHUFFLE_FILL(simd_shuffle_and_fill_down, kOpShuffleFillDown)
#undef JAX_MFA_EMU_SHUFFLE_FILL

inline bool simd_all(bool b, JAX_MFA_EMU_SITE_PARAMS) {
  return detail::lane_reduce(detail::kOpMin, "simd_all", int(b), JAX_MFA_EMU_SITE) != 0;
}
inline bool simd_any(bool b, JAX_MFA_EMU_SITE_PARAMS) {
  return detail::lane_reduce(detail::kOpMax, "simd_any", int(b), JAX_MFA_EMU_SITE) != 0;
}

// ---------------------------------------------------------------------------
// simdgroup_matrix<T, 8, 8>. Each lane holds 2 adjacent elements of one row:
// lane l holds row (l/16)*4 + (l/2)%4, columns ((l/8)%2)*4 + (l%2)*2 and +1.
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices exist in Metal");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.e = vec<T, 2>(value);
  return m;
}

namespace detail {
inline int mat_row(int lane) { return (lane / 16) * 4 + (lane / 2) % 4; }
inline int mat_col(int lane) { return ((lane / 8) % 2) * 4 + (lane % 2) * 2; }

[[noreturn]] inline void matrix_misuse(const char* what, const char* why) {
  Worker& w = worker();
  char buf[300];
  std::snprintf(buf, sizeof buf, "%s: %s (simdgroup %d)", what, why, w.cur / 32);
  fail(kDivergence, buf);
}

template <class M, class P>
struct MatIO {
  M* m;
  P* p;
  const Region* r;
  ulong epr;
  ulong ox, oy;
  bool tr;
};

template <class T, class P, bool kStore>
inline void mat_io(void** data, int n, int sgi, const char* what) {
  using IO = MatIO<simdgroup_matrix<T, 8, 8>, P>;
  if (n != 32) matrix_misuse(what, "simdgroup_matrix operations need a full simdgroup of 32 active threads");
  const IO& a = *static_cast<IO*>(data[0]);
  for (int l = 1; l < 32; ++l) {
    const IO& b = *static_cast<IO*>(data[l]);
    if (b.p != a.p || b.epr != a.epr || b.ox != a.ox || b.oy != a.oy || b.tr != a.tr)
      matrix_misuse(what, "pointer, elements_per_row, origin and transpose must be the same in all lanes");
  }
  for (int l = 0; l < 32; ++l) {
    IO& io = *static_cast<IO*>(data[l]);
    const int row = mat_row(l), c0 = mat_col(l);
    for (int j = 0; j < 2; ++j) {
      const int col = c0 + j;
      const ulong idx = a.tr ? (a.oy + ulong(col)) * a.epr + a.ox + ulong(row)
                             : (a.oy + ulong(row)) * a.epr + a.ox + ulong(col);
      P* q = a.p + idx;
      access(q, sizeof(P), a.r, kStore, sgi * 32 + l);
      if constexpr (kStore) *q = P(io.m->e.v[j]);
      else io.m->e.v[j] = T(*q);
    }
  }
}
}  // namespace detail

template <class T, class P, int S>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const as_ptr<P, S>& src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false,
                           JAX_MFA_EMU_SITE_PARAMS) {
  static_assert(std::is_same<std::remove_cv_t<P>, T>::value, "simdgroup_load: element type mismatch");
  detail::MatIO<simdgroup_matrix<T, 8, 8>, P> io{&d, src.p, src.r, elements_per_row,
                                                 matrix_origin.x, matrix_origin.y, transpose_matrix};
  detail::collective(detail::kOpMatLoad, "simdgroup_load", JAX_MFA_EMU_SITE, &io, [](void** data, int n, int sgi) {
    detail::count(S == detail::kThreadgroupSpace ? detail::kCount_simdgroup_matrix_load_threadgroup
                  : S == detail::kConstantSpace  ? detail::kCount_simdgroup_matrix_load_constant
                                                 : detail::kCount_simdgroup_matrix_load_device,
                  1, sgi * 32);
    detail::mat_io<T, P, false>(data, n, sgi, "simdgroup_load");
  });
}

template <class T, class P, int S>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, const as_ptr<P, S>& dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false,
                            JAX_MFA_EMU_SITE_PARAMS) {
  static_assert(std::is_same<P, T>::value, "simdgroup_store: element type mismatch");
  static_assert(S != detail::kConstantSpace, "simdgroup_store to constant memory");
  detail::MatIO<simdgroup_matrix<T, 8, 8>, P> io{const_cast<simdgroup_matrix<T, 8, 8>*>(&a), dst.p, dst.r,
                                                 elements_per_row, matrix_origin.x, matrix_origin.y,
                                                 transpose_matrix};
  detail::collective(detail::kOpMatStore, "simdgroup_store", JAX_MFA_EMU_SITE, &io, [](void** data, int n, int sgi) {
    detail::count(S == detail::kThreadgroupSpace ? detail::kCount_simdgroup_matrix_store_threadgroup
                                                 : detail::kCount_simdgroup_matrix_store_device,
                  1, sgi * 32);
    detail::mat_io<T, P, true>(data, n, sgi, "simdgroup_store");
  });
}

namespace detail {
template <class T>
inline void gather(void* const* mats, float out[8][8]) {
  for (int l = 0; l < 32; ++l) {
    const auto* m = static_cast<const simdgroup_matrix<T, 8, 8>*>(mats[l]);
    out[mat_row(l)][mat_col(l)] = float(m->e.v[0]);
    out[mat_row(l)][mat_col(l) + 1] = float(m->e.v[1]);
  }
}
template <class D, class A, class B, class C>
struct MMA {
  simdgroup_matrix<D, 8, 8>* d;
  const simdgroup_matrix<A, 8, 8>* a;
  const simdgroup_matrix<B, 8, 8>* b;
  const simdgroup_matrix<C, 8, 8>* c;
};
template <class D, class A, class B, class C>
inline void mma(void** data, int n, int sgi, const char* what) {
  if (n != 32) matrix_misuse(what, "simdgroup_matrix operations need a full simdgroup of 32 active threads");
  count(kCount_simdgroup_matrix_multiply_accumulate, 1, sgi * 32);
  // Both factors 16-bit (half or bfloat); the accumulator may be float.
  if (is_emu_float16<A>::value && is_emu_float16<B>::value)
    count(kCount_simdgroup_matrix_multiply_accumulate_16bit, 1, sgi * 32);
  using X = MMA<D, A, B, C>;
  void* pa[32];
  void* pb[32];
  void* pc[32];
  for (int l = 0; l < 32; ++l) {
    const X& x = *static_cast<X*>(data[l]);
    pa[l] = (void*)x.a;
    pb[l] = (void*)x.b;
    pc[l] = (void*)x.c;
  }
  float fa[8][8], fb[8][8], fc[8][8];
  gather<A>(pa, fa);
  gather<B>(pb, fb);
  if (pc[0]) gather<C>(pc, fc);
  else std::memset(fc, 0, sizeof fc);
  float out[8][8];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = fc[i][j];
      for (int k = 0; k < 8; ++k) s = __builtin_fmaf(fa[i][k], fb[k][j], s);
      out[i][j] = s;
    }
  for (int l = 0; l < 32; ++l) {
    X& x = *static_cast<X*>(data[l]);
    x.d->e.v[0] = D(out[mat_row(l)][mat_col(l)]);
    x.d->e.v[1] = D(out[mat_row(l)][mat_col(l) + 1]);
  }
}
}  // namespace detail

// d = a * b + c (accumulated in float, rounded once to d's type).
template <class D, class A, class B, class C>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<D, 8, 8>& d, const simdgroup_matrix<A, 8, 8>& a,
                                          const simdgroup_matrix<B, 8, 8>& b, const simdgroup_matrix<C, 8, 8>& c,
                                          JAX_MFA_EMU_SITE_PARAMS) {
  detail::MMA<D, A, B, C> x{&d, &a, &b, &c};
  detail::collective(detail::kOpMatMulAcc, "simdgroup_multiply_accumulate", JAX_MFA_EMU_SITE, &x,
                     [](void** data, int n, int sgi) {
                       detail::mma<D, A, B, C>(data, n, sgi, "simdgroup_multiply_accumulate");
                     });
}
template <class D, class A, class B>
inline void simdgroup_multiply(simdgroup_matrix<D, 8, 8>& d, const simdgroup_matrix<A, 8, 8>& a,
                               const simdgroup_matrix<B, 8, 8>& b, JAX_MFA_EMU_SITE_PARAMS) {
  detail::MMA<D, A, B, D> x{&d, &a, &b, nullptr};
  detail::collective(detail::kOpMatMul, "simdgroup_multiply", JAX_MFA_EMU_SITE, &x, [](void** data, int n, int sgi) {
    detail::mma<D, A, B, D>(data, n, sgi, "simdgroup_multiply");
  });
}

// ---------------------------------------------------------------------------
// Atomics (device or threadgroup memory). Real atomics across threadgroups.
enum memory_order { memory_order_relaxed = 0, memory_order_acquire, memory_order_release, memory_order_acq_rel,
                    memory_order_seq_cst };
template <class T>
struct atomic {
  T v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;

namespace detail {
template <class T, class F>
inline T atomic_rmw(T* p, F f) {
  if constexpr (std::is_floating_point<T>::value) {
    uint32_t* u = reinterpret_cast<uint32_t*>(p);
    uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
      const T o = as_type<T>(old);
      const uint32_t nw = as_type<uint32_t>(T(f(o)));
      if (__atomic_compare_exchange_n(u, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
    }
  } else {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
      const T nw = T(f(old));
      if (__atomic_compare_exchange_n(p, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
  }
}
}  // namespace detail

#define JAX_MFA_EMU_ATOMIC_RMW(NAME, EXPR)                                                       \
  template <class T, int S, class U>                                                             \
  inline T NAME(as_ptr<atomic<T>, S> obj, U operand, memory_order = memory_order_relaxed) {      \
    detail::access_atomic(obj.p, sizeof(T), obj.r);                                              \
    const T y = T(operand);                                                                      \
    return detail::atomic_rmw(&obj.p->v, [y](T x) { return EXPR; });                              \
  }
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_add_explicit, x + y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_sub_explicit, x - y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_max_explicit, x > y ? x : y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_min_explicit, x < y ? x : y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_and_explicit, x & y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_or_explicit, x | y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_fetch_xor_explicit, x ^ y)
JAX_MFA_EMU_ATOMIC_RMW(atomic_exchange_explicit, ((void)x, y))
#undef JAX_MFA_EMU_ATOMIC_RMW

template <class T, int S>
inline T atomic_load_explicit(as_ptr<atomic<T>, S> obj, memory_order = memory_order_relaxed) {
  detail::access_atomic(obj.p, sizeof(T), obj.r);
  return __atomic_load_n(&obj.p->v, __ATOMIC_RELAXED);
}
template <class T, int S, class U>
inline void atomic_store_explicit(as_ptr<atomic<T>, S> obj, U value, memory_order = memory_order_relaxed) {
  detail::access_atomic(obj.p, sizeof(T), obj.r);
  __atomic_store_n(&obj.p->v, T(value), __ATOMIC_RELAXED);
}
template <class T, int S, class U>
inline bool atomic_compare_exchange_weak_explicit(as_ptr<atomic<T>, S> obj, T* expected, U desired,
                                                  memory_order = memory_order_relaxed,
                                                  memory_order = memory_order_relaxed) {
  detail::access_atomic(obj.p, sizeof(T), obj.r);
  return __atomic_compare_exchange_n(&obj.p->v, expected, T(desired), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

// is_function_constant_defined(c): whether this dispatch gives c a value.
template <class T, int I>
inline bool is_function_constant_defined(const detail::function_constant<T, I>& c) {
  return c.defined();
}

}  // namespace metal

// Metal's function qualifier for helpers (always inlined by Apple's compiler).
#define METAL_FUNC inline
// Math-mode arguments of Metal's __metal_* built-ins (used by MLX's bf16_math.h).
#define __METAL_MAYBE_FAST_MATH__ 0
#define __METAL_FAST_MATH__ 1
#define __METAL_PRECISE_MATH__ 2

// Registers an explicit kernel instantiation under a host name (what
// `template [[host_name(N)]] [[kernel]] decltype(F<A>) F<A>;` does in Metal;
// the source pass rewrites that form into this macro, also inside #defines).
#define JAX_MFA_EMU_CAT2(a, b) a##b
#define JAX_MFA_EMU_CAT(a, b) JAX_MFA_EMU_CAT2(a, b)
#define JAX_MFA_EMU_REGISTER_KERNEL(name, function, ...)                                   \
  static ::metal::detail::KernelRegistrar JAX_MFA_EMU_CAT(jax_mfa_emu_reg_, __COUNTER__)( \
      name, &function<__VA_ARGS__>, JAX_MFA_EMU_CAT(jax_mfa_emu_bind_, function),          \
      JAX_MFA_EMU_CAT(jax_mfa_emu_nbind_, function));

// Metal's __metal_* built-ins, as far as headers that wrap them need
// (MLX's bf16_math.h): each forwards to the function of the same name; the
// math-mode argument is ignored. A SIMD-group function reached through such
// a wrapper is identified by the wrapper's line (see "Barrier identity").
#define JAX_MFA_EMU_BUILTIN(NAME)                      \
  template <class T, class... Rest>                    \
  inline auto __metal_##NAME(T x, Rest...) {           \
    return ::metal::NAME(x);                           \
  }
#define JAX_MFA_EMU_BUILTIN2(NAME)                     \
  template <class T, class... Rest>                    \
  inline auto __metal_##NAME(T x, T y, Rest...) {      \
    return ::metal::NAME(x, y);                        \
  }
JAX_MFA_EMU_BUILTIN(exp) JAX_MFA_EMU_BUILTIN(exp2) JAX_MFA_EMU_BUILTIN(exp10) JAX_MFA_EMU_BUILTIN(log)
JAX_MFA_EMU_BUILTIN(log2) JAX_MFA_EMU_BUILTIN(log10) JAX_MFA_EMU_BUILTIN(sqrt) JAX_MFA_EMU_BUILTIN(rsqrt)
JAX_MFA_EMU_BUILTIN(sin) JAX_MFA_EMU_BUILTIN(cos) JAX_MFA_EMU_BUILTIN(tan) JAX_MFA_EMU_BUILTIN(sinh)
JAX_MFA_EMU_BUILTIN(cosh) JAX_MFA_EMU_BUILTIN(tanh) JAX_MFA_EMU_BUILTIN(asin) JAX_MFA_EMU_BUILTIN(acos)
JAX_MFA_EMU_BUILTIN(atan) JAX_MFA_EMU_BUILTIN(floor) JAX_MFA_EMU_BUILTIN(ceil) JAX_MFA_EMU_BUILTIN(round)
JAX_MFA_EMU_BUILTIN(trunc) JAX_MFA_EMU_BUILTIN(rint) JAX_MFA_EMU_BUILTIN(fabs) JAX_MFA_EMU_BUILTIN(fract)
JAX_MFA_EMU_BUILTIN2(fmax) JAX_MFA_EMU_BUILTIN2(fmin) JAX_MFA_EMU_BUILTIN2(pow) JAX_MFA_EMU_BUILTIN2(powr)
JAX_MFA_EMU_BUILTIN2(fmod) JAX_MFA_EMU_BUILTIN2(atan2) JAX_MFA_EMU_BUILTIN2(divide)
#undef JAX_MFA_EMU_BUILTIN
#undef JAX_MFA_EMU_BUILTIN2
template <class T, class... Rest> inline T __metal_acosh(T x, Rest...) { return T(__builtin_acoshf(float(x))); }
template <class T, class... Rest> inline T __metal_asinh(T x, Rest...) { return T(__builtin_asinhf(float(x))); }
template <class T, class... Rest> inline T __metal_atanh(T x, Rest...) { return T(__builtin_atanhf(float(x))); }
template <class T, class... Rest> inline T __metal_cospi(T x, Rest...) { return ::metal::cos(float(x) * M_PI_F); }
template <class T, class... Rest> inline T __metal_sinpi(T x, Rest...) { return ::metal::sin(float(x) * M_PI_F); }
template <class T, class... Rest> inline T __metal_tanpi(T x, Rest...) { return ::metal::tan(float(x) * M_PI_F); }
template <class T> inline T __metal_fma(T a, T b, T c) { return ::metal::fma(a, b, c); }
template <class T, class... Rest> inline T __metal_fmax3(T a, T b, T c, Rest...) { return ::metal::fmax(::metal::fmax(a, b), c); }
template <class T, class... Rest> inline T __metal_fmin3(T a, T b, T c, Rest...) { return ::metal::fmin(::metal::fmin(a, b), c); }
template <class T, class... Rest> inline T __metal_fmedian3(T a, T b, T c, Rest...) {
  return ::metal::fmax(::metal::fmin(a, b), ::metal::fmin(::metal::fmax(a, b), c));
}
template <class T, class I> inline T __metal_frexp(T x, I* e) { int k = 0; T m = T(__builtin_frexpf(float(x), &k)); *e = I(k); return m; }
template <class T, class I, class... Rest> inline T __metal_ldexp(T x, I k, Rest...) { return T(__builtin_ldexpf(float(x), int(k))); }
template <class T> inline T __metal_nextafter(T x, T y) { return T(__builtin_nextafterf(float(x), float(y))); }
template <class T> inline T __metal_get_simdgroup_size(T) { return T(32); }
#define JAX_MFA_EMU_SIMD_BUILTIN(NAME)                                 \
  template <class T, class... Rest>                                    \
  inline T __metal_##NAME(T x, Rest... rest) {                         \
    return ::metal::NAME(x, rest...);                                  \
  }
JAX_MFA_EMU_SIMD_BUILTIN(simd_broadcast) JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle)
JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_up) JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_down)
JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_xor) JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_rotate_up)
JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_rotate_down) JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_and_fill_up)
JAX_MFA_EMU_SIMD_BUILTIN(simd_shuffle_and_fill_down) JAX_MFA_EMU_SIMD_BUILTIN(simd_sum)
JAX_MFA_EMU_SIMD_BUILTIN(simd_product) JAX_MFA_EMU_SIMD_BUILTIN(simd_max) JAX_MFA_EMU_SIMD_BUILTIN(simd_min)
JAX_MFA_EMU_SIMD_BUILTIN(simd_prefix_exclusive_sum) JAX_MFA_EMU_SIMD_BUILTIN(simd_prefix_inclusive_sum)
JAX_MFA_EMU_SIMD_BUILTIN(simd_prefix_exclusive_product) JAX_MFA_EMU_SIMD_BUILTIN(simd_prefix_inclusive_product)
JAX_MFA_EMU_SIMD_BUILTIN(simd_xor)
#undef JAX_MFA_EMU_SIMD_BUILTIN

#pragma GCC visibility pop
