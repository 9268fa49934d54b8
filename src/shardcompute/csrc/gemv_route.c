/* Route MLX's single-row float32 matmuls to OpenBLAS's gemv.
 *
 * MLX's CPU backend does every float32 matmul with cblas_sgemm. In decode, one operand is a
 * single row (M == 1) or column (N == 1), and OpenBLAS's sgemm runs that at about a third of
 * the memory bandwidth its sgemv reaches. Loaded RTLD_GLOBAL before MLX, this library's
 * cblas_sgemm sends those calls to sgemv and every other call to sgemm, both from the
 * OpenBLAS named in gemv_route_init (its symbols may carry a prefix, e.g. "scipy_").
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*set_threads_fn)(int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static set_threads_fn real_set_threads;
static long routed_calls;

/* Threads: sgemm (prefill) gets `gemm_threads`; a sgemv gets them only when its matrix has at
 * least `gemv_split_elems` elements. Waking BLAS threads costs more than a small gemv saves,
 * and one core already streams a small matrix at most of the memory bandwidth. */
static int gemm_threads = 1, current_threads = -1;
static long gemv_split_elems = 1L << 22;

static void use_threads(int n) {
  if (n != current_threads && real_set_threads) {
    real_set_threads(n);
    current_threads = n;
  }
}

static void *lookup(void *lib, const char *prefix, const char *name) {
  char full[128];
  snprintf(full, sizeof full, "%s%s", prefix, name);
  return dlsym(lib, full);
}

/* 0 on success; -1 if the library can't be opened, -2 if a symbol is missing. */
int gemv_route_init(const char *path, const char *prefix) {
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return -1;
  real_sgemm = (sgemm_fn)lookup(lib, prefix, "cblas_sgemm");
  real_sgemv = (sgemv_fn)lookup(lib, prefix, "cblas_sgemv");
  real_set_threads = (set_threads_fn)lookup(lib, prefix, "openblas_set_num_threads");
  return real_sgemm && real_sgemv ? 0 : -2;
}

void gemv_route_set_threads(int n, long split_elems) {
  gemm_threads = n > 0 ? n : 1;
  if (split_elems > 0) gemv_split_elems = split_elems;
  current_threads = -1;
}

long gemv_route_calls(void) { return routed_calls; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  if (order == ROW_MAJOR && (m == 1 || n == 1) && beta == 0.0f) {
    /* BLAS may scale c by beta instead of ignoring it, and 0 * NaN is NaN: MLX's output
     * buffer is uninitialised, so clear it first. */
    if (m == 1) memset(c, 0, sizeof(float) * n);
    else for (int i = 0; i < m; i++) c[(long)i * ldc] = 0.0f;
  }
  if (order == ROW_MAJOR && (m == 1 || n == 1))
    use_threads((long)m * n * k >= gemv_split_elems ? gemm_threads : 1);
  else
    use_threads(gemm_threads);
  if (order == ROW_MAJOR && m == 1) {
    /* c[1,n] = a[1,k] op(b): a gemv over b, whose stored rows are n long if b is transposed. */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (trans_b == TRANS)
      real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
    else
      real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    routed_calls++;
  } else if (order == ROW_MAJOR && n == 1) {
    /* c[m,1] = op(a)[m,k] b[k,1]; c's column has stride ldc. */
    int inc_b = trans_b == NO_TRANS ? ldb : 1;
    if (trans_a == NO_TRANS)
      real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
    else
      real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
    routed_calls++;
  } else {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}
