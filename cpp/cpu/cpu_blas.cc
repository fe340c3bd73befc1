#include "cpu/cpu_blas.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#if defined(__APPLE__)
#include <Accelerate/Accelerate.h>
#elif !defined(_WIN32)
#include <dlfcn.h>
#endif

namespace jax_mfa {
namespace cpu {
namespace {

// CBLAS enum values (identical in every CBLAS).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);
using DgemmFn = void (*)(int, int, int, int, int, int, double, const double*, int,
                         const double*, int, double, double*, int);

struct Blas {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
  std::string where = "built-in loops";
};

#if !defined(__APPLE__) && !defined(_WIN32)
// Tries one OpenBLAS build by path; the scipy-openblas wheels prefix their
// symbols with "scipy_".
bool try_open(const std::string& path, Blas& blas) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) return false;
  for (const char* prefix : {"scipy_", ""}) {
    const std::string p = prefix;
    auto s = reinterpret_cast<SgemmFn>(dlsym(lib, (p + "cblas_sgemm").c_str()));
    auto d = reinterpret_cast<DgemmFn>(dlsym(lib, (p + "cblas_dgemm").c_str()));
    auto threads =
        reinterpret_cast<void (*)(int)>(dlsym(lib, (p + "openblas_set_num_threads").c_str()));
    if (s && d && threads) {
      threads(1);  // each worker task calls it single-threaded
      blas.sgemm = s;
      blas.dgemm = d;
      blas.where = path;
      return true;
    }
  }
  dlclose(lib);
  return false;
}

std::string directory_of_this_library() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&try_open), &info) || !info.dli_fname) return ".";
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}
#endif

Blas load() {
  Blas blas;
#if defined(__APPLE__)
  blas.sgemm = [](int o, int ta, int tb, int m, int n, int k, float al, const float* a, int lda,
                  const float* b, int ldb, float be, float* c, int ldc) {
    cblas_sgemm(CBLAS_ORDER(o), CBLAS_TRANSPOSE(ta), CBLAS_TRANSPOSE(tb), m, n, k, al, a, lda, b,
                ldb, be, c, ldc);
  };
  blas.dgemm = [](int o, int ta, int tb, int m, int n, int k, double al, const double* a,
                  int lda, const double* b, int ldb, double be, double* c, int ldc) {
    cblas_dgemm(CBLAS_ORDER(o), CBLAS_TRANSPOSE(ta), CBLAS_TRANSPOSE(tb), m, n, k, al, a, lda, b,
                ldb, be, c, ldc);
  };
  blas.where = "Accelerate";
#elif !defined(_WIN32)
  // 1. An explicit override; 2. the scipy-openblas32 wheel next to the
  // installed package (site-packages/jax_mfa/../scipy_openblas32/lib); 3. the
  // wheel the extension was built against (developer builds in a source tree).
  if (const char* env = std::getenv("JAX_MFA_BLAS_LIBRARY"); env && *env) {
    if (std::string(env) == "none") return blas;  // forces the built-in loops
    if (try_open(env, blas)) return blas;
  }
  const std::string here = directory_of_this_library();
  if (try_open(here + "/../scipy_openblas32/lib/libscipy_openblas.so", blas)) return blas;
#ifdef JAX_MFA_OPENBLAS_BUILD_PATH
  if (try_open(JAX_MFA_OPENBLAS_BUILD_PATH, blas)) return blas;
#endif
  std::fprintf(stderr,
               "jax_mfa: OpenBLAS (the scipy-openblas32 package) not found next to jax_mfa; "
               "the CPU kernels fall back to slow built-in loops. Set JAX_MFA_BLAS_LIBRARY to "
               "the path of libscipy_openblas.so to use it.\n");
#endif
  return blas;
}

const Blas& blas() {
  static const Blas instance = load();
  return instance;
}

// Fallback: row-major loop nest, inner loop over contiguous columns of C.
template <typename T>
void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t n = 0; n < N; ++n) c[n] = beta == T(0) ? T(0) : c[n] * beta;
    for (int64_t k = 0; k < K; ++k) {
      const T a = alpha * (ta ? A[k * lda + m] : A[m * lda + k]);
      if (a == T(0)) continue;
      if (!tb) {
        const T* b = B + k * ldb;
        for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
      } else {
        for (int64_t n = 0; n < N; ++n) c[n] += a * B[n * ldb + k];
      }
    }
  }
}

}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    gemm_loops(ta, tb, M, N, int64_t(0), alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (auto f = blas().sgemm)
    return f(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K),
             alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
  gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
          int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    gemm_loops(ta, tb, M, N, int64_t(0), alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (auto f = blas().dgemm)
    return f(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K),
             alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
  gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

const char* blas_description() { return blas().where.c_str(); }

}  // namespace cpu
}  // namespace jax_mfa
