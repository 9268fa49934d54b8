/* Route MLX's decode-shaped float32 matmuls to the OpenBLAS calls that run them fastest.
 *
 * MLX's CPU backend does every float32 matmul with cblas_sgemm. In decode, one operand is a
 * single row (M == 1) or column (N == 1), and OpenBLAS's sgemm runs that at about a third of
 * the memory bandwidth its sgemv reaches: those calls go to sgemv. A batch of a few rows
 * (2 <= M <= skinny_m, N large) is also slow as given, because OpenBLAS's kernels are fast
 * when the small dimension is the output's rows in column-major order: those calls compute
 * C^T = op(B)^T op(A)^T into a scratch buffer, a panel of columns at a time, and transpose it
 * back (M x N floats, small).
 * Everything else goes to sgemm as it came. Loaded RTLD_GLOBAL before MLX, this library's
 * cblas_sgemm takes MLX's calls; the OpenBLAS behind it is named in gemv_route_init (its
 * symbols may carry a prefix, e.g. "scipy_").
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
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
static int skinny_m = 32; /* the most rows a batch may have to take the transposed route */
/* ... taken in panels of at most this many weights (a large one, an LM head, in pieces). */
static long skinny_max_elems = 1L << 20;

/* Threads: a product gets `gemm_threads` only when it has at least `gemv_split_elems`
 * multiply-adds (m * n * k). Waking BLAS threads costs more than a small product saves, and one
 * core already streams a small matrix at most of the memory bandwidth. */
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

void gemv_route_set_skinny(int m) { skinny_m = m; }

static int flip(int trans) { return trans == TRANS ? NO_TRANS : TRANS; }

/* Row-major C[m,n] = alpha op(A) op(B) + beta C for a few rows m: computed as
 * T[w,m] = op(B)^T op(A)^T, a panel of w columns at a time (so a large B, an LM head, is taken
 * in cache-sized pieces), then C = T^T + beta C. 0 on success, -1 without memory. */
static int skinny(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                  const float *b, int ldb, float beta, float *c, int ldc) {
  long width = skinny_max_elems / (k > 0 ? k : 1);
  if (width > n) width = n;
  if (width < 1) width = 1;
  float *t = malloc(sizeof(float) * (size_t)m * width);
  if (!t) return -1;
  for (long j0 = 0; j0 < n; j0 += width) {
    int w = (int)(n - j0 < width ? n - j0 : width);
    const float *panel = tb == TRANS ? b + j0 * ldb : b + j0; /* op(B)'s columns j0.. */
    real_sgemm(ROW_MAJOR, flip(tb), flip(ta), w, m, k, alpha, panel, ldb, a, lda, 0.0f, t, m);
    for (int i = 0; i < m; i++) {
      float *row = c + (long)i * ldc + j0;
      if (beta == 0.0f)
        for (int j = 0; j < w; j++) row[j] = t[(long)j * m + i];
      else
        for (int j = 0; j < w; j++) row[j] = t[(long)j * m + i] + beta * row[j];
    }
  }
  free(t);
  return 0;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  if (order == ROW_MAJOR && (m == 1 || n == 1) && beta == 0.0f) {
    /* BLAS may scale c by beta instead of ignoring it, and 0 * NaN is NaN: MLX's output
     * buffer is uninitialised, so clear it first. */
    if (m == 1) memset(c, 0, sizeof(float) * n);
    else for (int i = 0; i < m; i++) c[(long)i * ldc] = 0.0f;
  }
  /* Small products (a decode step's attention: a few rows against one row's keys) run on
   * one thread: waking the others costs more than the product. */
  use_threads((long)m * n * k >= gemv_split_elems ? gemm_threads : 1);
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
  } else if (order == ROW_MAJOR && m <= skinny_m && n > 4 * skinny_m &&
             skinny(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0) {
    routed_calls++;
  } else {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}
