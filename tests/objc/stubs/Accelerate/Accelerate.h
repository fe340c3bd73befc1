// Declaration-only stand-in for Apple's <Accelerate/Accelerate.h>: the CBLAS
// GEMMs cpp/cpu/cpu_blas.cc calls on macOS (ACCELERATE_NEW_LAPACK names), so
// the Accelerate branch compiles in CI. Never linked, never run.
#pragma once

enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };
typedef int __LAPACK_int;

#ifdef __cplusplus
extern "C" {
#endif
void cblas_sgemm(const enum CBLAS_ORDER ORDER, const enum CBLAS_TRANSPOSE TRANSA,
                 const enum CBLAS_TRANSPOSE TRANSB, const __LAPACK_int M, const __LAPACK_int N,
                 const __LAPACK_int K, const float ALPHA, const float* A, const __LAPACK_int LDA,
                 const float* B, const __LAPACK_int LDB, const float BETA, float* C,
                 const __LAPACK_int LDC);
void cblas_dgemm(const enum CBLAS_ORDER ORDER, const enum CBLAS_TRANSPOSE TRANSA,
                 const enum CBLAS_TRANSPOSE TRANSB, const __LAPACK_int M, const __LAPACK_int N,
                 const __LAPACK_int K, const double ALPHA, const double* A,
                 const __LAPACK_int LDA, const double* B, const __LAPACK_int LDB,
                 const double BETA, double* C, const __LAPACK_int LDC);
#ifdef __cplusplus
}
#endif
