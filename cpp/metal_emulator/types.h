// Metal scalar and vector types for the Metal emulator: half, bfloat, vec<T,N>.
//
// half/bfloat store their bits and convert with the shared round-to-nearest-even
// routines of common/half_types.h. Arithmetic on half (bfloat) is computed in
// float and rounded back to half (bfloat) after every operation, which gives
// the correctly rounded result of each operation.
#pragma once

#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/half_types.h"

// Hidden visibility: every shared object gets its own registry, workers and
// statics (default-visibility inline statics would be merged process-wide).
#pragma GCC visibility push(hidden)

namespace metal {

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

namespace detail {
struct from_bits_t {};
}  // namespace detail

#define JAX_MFA_EMU_16BIT_FLOAT(NAME, TO_BITS, FROM_BITS)                                            \
  struct NAME {                                                                                       \
    uint16_t bits;                                                                                    \
    NAME() = default;                                                                                 \
    constexpr NAME(float f) : bits(::jax_mfa::TO_BITS(f)) {}                                          \
    constexpr NAME(double f) : bits(::jax_mfa::TO_BITS(float(f))) {}                                  \
    template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                         \
    constexpr NAME(I i) : bits(::jax_mfa::TO_BITS(float(i))) {}                                       \
    constexpr NAME(detail::from_bits_t, uint16_t b) : bits(b) {}                                      \
    constexpr operator float() const { return ::jax_mfa::FROM_BITS(bits); }                           \
    constexpr NAME operator-() const { return NAME(detail::from_bits_t{}, uint16_t(bits ^ 0x8000u)); } \
    constexpr NAME operator+() const { return *this; }                                                \
  };

JAX_MFA_EMU_16BIT_FLOAT(half, float_to_half_bits, half_bits_to_float)
JAX_MFA_EMU_16BIT_FLOAT(bfloat, float_to_bfloat_bits, bfloat_bits_to_float)
#undef JAX_MFA_EMU_16BIT_FLOAT

// Explicit conversions between the two 16-bit types go through float.
template <class T>
struct is_emu_float16 : std::integral_constant<bool, std::is_same<T, half>::value || std::is_same<T, bfloat>::value> {};

// Operators: H op H -> H; H op float/double -> float; H op integer -> H;
// half op bfloat -> float.
#define JAX_MFA_EMU_H_OPS(H)                                                                          \
  JAX_MFA_EMU_H_OP(H, +) JAX_MFA_EMU_H_OP(H, -) JAX_MFA_EMU_H_OP(H, *) JAX_MFA_EMU_H_OP(H, /)        \
  JAX_MFA_EMU_H_CMP(H, ==) JAX_MFA_EMU_H_CMP(H, !=) JAX_MFA_EMU_H_CMP(H, <) JAX_MFA_EMU_H_CMP(H, >)  \
  JAX_MFA_EMU_H_CMP(H, <=) JAX_MFA_EMU_H_CMP(H, >=)
#define JAX_MFA_EMU_H_OP(H, OP)                                                                          \
  constexpr H operator OP(H a, H b) { return H(float(a) OP float(b)); }                                  \
  constexpr float operator OP(H a, float b) { return float(a) OP b; }                                    \
  constexpr float operator OP(float a, H b) { return a OP float(b); }                                    \
  constexpr float operator OP(H a, double b) { return float(a) OP float(b); }                            \
  constexpr float operator OP(double a, H b) { return float(a) OP float(b); }                            \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                              \
  constexpr H operator OP(H a, I b) { return H(float(a) OP float(b)); }                                  \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                              \
  constexpr H operator OP(I a, H b) { return H(float(a) OP float(b)); }                                  \
  template <class X>                                                                                     \
  constexpr H& operator OP##=(H& a, const X& b) { a = H(float(a) OP float(b)); return a; }
#define JAX_MFA_EMU_H_CMP(H, OP)                                                       \
  constexpr bool operator OP(H a, H b) { return float(a) OP float(b); }                \
  constexpr bool operator OP(H a, float b) { return float(a) OP b; }                   \
  constexpr bool operator OP(float a, H b) { return a OP float(b); }                   \
  constexpr bool operator OP(H a, double b) { return float(a) OP float(b); }           \
  constexpr bool operator OP(double a, H b) { return float(a) OP float(b); }           \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>            \
  constexpr bool operator OP(H a, I b) { return float(a) OP float(b); }                \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>            \
  constexpr bool operator OP(I a, H b) { return float(a) OP float(b); }
JAX_MFA_EMU_H_OPS(half)
JAX_MFA_EMU_H_OPS(bfloat)
#undef JAX_MFA_EMU_H_OPS
#undef JAX_MFA_EMU_H_OP
#undef JAX_MFA_EMU_H_CMP
#define JAX_MFA_EMU_HB_OP(OP)                                            \
  inline float operator OP(half a, bfloat b) { return float(a) OP float(b); } \
  inline float operator OP(bfloat a, half b) { return float(a) OP float(b); }
JAX_MFA_EMU_HB_OP(+) JAX_MFA_EMU_HB_OP(-) JAX_MFA_EMU_HB_OP(*) JAX_MFA_EMU_HB_OP(/)
#undef JAX_MFA_EMU_HB_OP
inline half& operator++(half& a) { return a = half(float(a) + 1.0f); }
inline half& operator--(half& a) { return a = half(float(a) - 1.0f); }

// Scalar element types usable in vectors.
template <class T>
struct is_emu_scalar : std::integral_constant<bool, std::is_arithmetic<T>::value || is_emu_float16<T>::value> {};

// ---------------------------------------------------------------------------
// Vectors. Storage is a union of an array and named members (x y z w / r g b a)
// plus a few swizzles (xy, yx, xz, yz, zw, xyz, yzw, xyzw).
template <class T, int N>
struct vec;

namespace detail {
template <class T, int N, int... I>
struct swizzle {
  T v[N];
  using element_type = T;
  static constexpr int M = sizeof...(I);
  vec<T, M> get() const;
  operator vec<T, M>() const { return get(); }
  swizzle& operator=(const vec<T, M>& o);
  vec<T, M> operator()() const { return *this; }
};
}  // namespace detail

template <class T, int N>
struct vec_storage;
template <class T>
struct vec_storage<T, 2> {
  union {
    T v[2];
    struct { T x, y; };
    struct { T r, g; };
    detail::swizzle<T, 2, 0, 1> xy;
    detail::swizzle<T, 2, 1, 0> yx;
  };
};
template <class T>
struct vec_storage<T, 3> {
  union {
    T v[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    detail::swizzle<T, 3, 0, 1> xy;
    detail::swizzle<T, 3, 1, 0> yx;
    detail::swizzle<T, 3, 0, 2> xz;
    detail::swizzle<T, 3, 1, 2> yz;
    detail::swizzle<T, 3, 0, 1, 2> xyz;
  };
};
template <class T>
struct vec_storage<T, 4> {
  union {
    T v[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    detail::swizzle<T, 4, 0, 1> xy;
    detail::swizzle<T, 4, 1, 0> yx;
    detail::swizzle<T, 4, 0, 2> xz;
    detail::swizzle<T, 4, 1, 2> yz;
    detail::swizzle<T, 4, 2, 3> zw;
    detail::swizzle<T, 4, 0, 1, 2> xyz;
    detail::swizzle<T, 4, 1, 2, 3> yzw;
    detail::swizzle<T, 4, 0, 1, 2, 3> xyzw;
  };
};

template <class T>
struct is_emu_vec : std::false_type {};
// Element proxies of checked pointers (core.h) holding a scalar.
template <class T>
struct is_scalar_proxy : std::false_type {};
template <class T, int N>
struct is_emu_vec<vec<T, N>> : std::true_type {};

namespace detail {
template <class T>
struct comp_count { static constexpr int value = 1; };
template <class T, int N, int... I>
struct comp_count<swizzle<T, N, I...>> { static constexpr int value = sizeof...(I); };
template <class T, int N>
struct comp_count<vec<T, N>> { static constexpr int value = N; };
}  // namespace detail

template <class T, int N>
struct vec : vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "vec<T, N> needs 2 <= N <= 4");
  using element_type = T;
  vec() = default;
  // Scalar splat (implicit, as in Metal).
  template <class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>
  vec(U s) {
    for (int i = 0; i < N; ++i) this->v[i] = T(s);
  }
  template <class U, std::enable_if_t<is_scalar_proxy<U>::value, int> = 0>
  vec(const U& s) : vec(s.get()) {}
  // Component-wise construction from scalars and vectors, e.g. float4(a.xy, 0, 1).
  template <class A, class B, class... R>
  vec(const A& a, const B& b, const R&... rest) {
    static_assert(detail::comp_count<A>::value + detail::comp_count<B>::value +
                          (0 + ... + detail::comp_count<R>::value) == N,
                  "wrong number of vector components");
    int k = 0;
    put(k, a);
    put(k, b);
    (put(k, rest), ...);
  }
  // Conversion between element types (explicit, as in Metal).
  template <class U, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) this->v[i] = T(float_if_16(o.v[i]));
  }
  template <int M, int... I, std::enable_if_t<sizeof...(I) == N, int> = 0>
  vec(const detail::swizzle<T, M, I...>& s) {
    int k = 0;
    ((this->v[k++] = s.v[I]), ...);
  }

  T& operator[](int i) { return this->v[i]; }
  const T& operator[](int i) const { return this->v[i]; }

 private:
  template <class U>
  static auto float_if_16(const U& u) {
    if constexpr (is_emu_float16<U>::value) return float(u);
    else return u;
  }
  template <class U>
  void put(int& k, const U& u) {
    if constexpr (is_emu_vec<U>::value) {
      for (int i = 0; i < detail::comp_count<U>::value; ++i) this->v[k++] = T(float_if_16(u.v[i]));
    } else if constexpr (is_emu_scalar<U>::value) {
      this->v[k++] = T(float_if_16(u));
    } else {
      put(k, u.get());
    }
  }
};

namespace detail {
template <class T, int N, int... I>
vec<T, swizzle<T, N, I...>::M> swizzle<T, N, I...>::get() const {
  vec<T, M> r;
  int k = 0;
  ((r.v[k++] = v[I]), ...);
  return r;
}
template <class T, int N, int... I>
swizzle<T, N, I...>& swizzle<T, N, I...>::operator=(const vec<T, M>& o) {
  int k = 0;
  ((v[I] = o.v[k++]), ...);
  return *this;
}
}  // namespace detail

// Element-wise operators.
#define JAX_MFA_EMU_VEC_BINOP(OP)                                                              \
  template <class T, int N>                                                                    \
  inline vec<T, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) {                       \
    vec<T, N> r;                                                                               \
    for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] OP b.v[i]);                                  \
    return r;                                                                                  \
  }                                                                                            \
  template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>      \
  inline vec<T, N> operator OP(const vec<T, N>& a, U s) {                                      \
    vec<T, N> r;                                                                               \
    const T t = T(s);                                                                          \
    for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] OP t);                                       \
    return r;                                                                                  \
  }                                                                                            \
  template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>      \
  inline vec<T, N> operator OP(U s, const vec<T, N>& a) {                                      \
    vec<T, N> r;                                                                               \
    const T t = T(s);                                                                          \
    for (int i = 0; i < N; ++i) r.v[i] = T(t OP a.v[i]);                                       \
    return r;                                                                                  \
  }                                                                                            \
  template <class T, int N, class U>                                                           \
  inline vec<T, N>& operator OP##=(vec<T, N>& a, const U& b) {                                 \
    a = a OP b;                                                                                \
    return a;                                                                                  \
  }
JAX_MFA_EMU_VEC_BINOP(+)
JAX_MFA_EMU_VEC_BINOP(-)
JAX_MFA_EMU_VEC_BINOP(*)
JAX_MFA_EMU_VEC_BINOP(/)
JAX_MFA_EMU_VEC_BINOP(%)
JAX_MFA_EMU_VEC_BINOP(&)
JAX_MFA_EMU_VEC_BINOP(|)
JAX_MFA_EMU_VEC_BINOP(^)
JAX_MFA_EMU_VEC_BINOP(<<)
JAX_MFA_EMU_VEC_BINOP(>>)
#undef JAX_MFA_EMU_VEC_BINOP

#define JAX_MFA_EMU_VEC_CMP(OP)                                                               \
  template <class T, int N>                                                                   \
  inline vec<bool, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) {                   \
    vec<bool, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];                                    \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>     \
  inline vec<bool, N> operator OP(const vec<T, N>& a, U s) {                                  \
    return a OP vec<T, N>(s);                                                                 \
  }                                                                                           \
  template <class T, int N, class U, std::enable_if_t<is_emu_scalar<U>::value, int> = 0>     \
  inline vec<bool, N> operator OP(U s, const vec<T, N>& a) {                                  \
    return vec<T, N>(s) OP a;                                                                 \
  }
JAX_MFA_EMU_VEC_CMP(==)
JAX_MFA_EMU_VEC_CMP(!=)
JAX_MFA_EMU_VEC_CMP(<)
JAX_MFA_EMU_VEC_CMP(>)
JAX_MFA_EMU_VEC_CMP(<=)
JAX_MFA_EMU_VEC_CMP(>=)
#undef JAX_MFA_EMU_VEC_CMP

template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = T(-a.v[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <int N>
inline vec<bool, N> operator!(const vec<bool, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = !a.v[i];
  return r;
}
template <int N>
inline bool all(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i) if (!a.v[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i) if (a.v[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

#define JAX_MFA_EMU_VEC_NAMES(T)   \
  typedef vec<T, 2> T##2;          \
  typedef vec<T, 3> T##3;          \
  typedef vec<T, 4> T##4;
JAX_MFA_EMU_VEC_NAMES(bool)
JAX_MFA_EMU_VEC_NAMES(char)
JAX_MFA_EMU_VEC_NAMES(uchar)
JAX_MFA_EMU_VEC_NAMES(short)
JAX_MFA_EMU_VEC_NAMES(ushort)
JAX_MFA_EMU_VEC_NAMES(int)
JAX_MFA_EMU_VEC_NAMES(uint)
JAX_MFA_EMU_VEC_NAMES(long)
JAX_MFA_EMU_VEC_NAMES(ulong)
JAX_MFA_EMU_VEC_NAMES(half)
JAX_MFA_EMU_VEC_NAMES(bfloat)
JAX_MFA_EMU_VEC_NAMES(float)
#undef JAX_MFA_EMU_VEC_NAMES

}  // namespace metal

#pragma GCC visibility pop
