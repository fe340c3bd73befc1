// JAX_MFA_X86: x86 under GCC or Clang, whose target attributes let one file
// hold code for several instruction sets. Such code runs only after a CPU
// feature check (cpu_simd.cc, cpu_bf16.cc, cpu_f32_tiles.cc). Never on an
// Arm target, even where __x86_64__ is defined for the host's C headers (the
// arm64 macOS compile check on Linux, tests/objc/darwin.py).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__aarch64__) && !defined(__arm64__)
#define JAX_MFA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
