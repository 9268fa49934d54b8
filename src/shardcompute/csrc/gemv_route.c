/* Route MLX's decode-shaped float32 matmuls to the code that runs them fastest.
 *
 * MLX's CPU backend does every float32 matmul with cblas_sgemm. In decode, the activations are
 * a few rows (one per sequence in the batch) against a weight matrix stored as rows of k floats
 * (x @ w.T, B transposed). OpenBLAS's sgemm runs that shape at a fraction of the memory
 * bandwidth, and a batch of 2 rows cost it about what 2 separate rows cost. Those products
 * (m <= small_m rows) go to `small_nt` below: each weight row is read from memory once and
 * multiplied with every activation row while it is in L1, with the weight rows split between
 * the threads by OpenMP. It is plain C with GCC vector extensions, built here for this CPU.
 * Other single-row or single-column products go to OpenBLAS's sgemv. A product of a few rows
 * in another layout (2 <= M <= skinny_m, N large) computes C^T = op(B)^T op(A)^T with sgemm into
 * a scratch buffer, a panel of columns at a time, and transposes it back (M x N floats, small).
 * Everything else goes to sgemm as it came. With OpenMP, a large sgemm is split between
 * OpenMP's threads, each running OpenBLAS on one thread (see split_sgemm): one pool of
 * threads in the process, not two spinning beside each other. Loaded RTLD_GLOBAL before MLX,
 * this library's cblas_sgemm takes MLX's calls; the OpenBLAS behind it is named in
 * gemv_route_init (its symbols may carry a prefix, e.g. "scipy_").
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

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

/* ---- small_nt: C[m,n] = alpha A[m,k] B[n,k]^T + beta C, row-major, for a few rows m ---- */

static int small_m = 16; /* the most rows that take small_nt (0: never) */

static inline void store(float *c, float dot, float alpha, float beta) {
  *c = beta == 0.0f ? alpha * dot : alpha * dot + beta * *c;
}

/* One tile: r weight rows (C's columns) against g activation rows (C's rows), r * g vector
 * accumulators, in one pass over k. Inlined with constant r and g, its loops unroll and the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(int r, int g, int k, float alpha,
                                                       const float *x, int lda, const float *w,
                                                       int ldb, float beta, float *c, int ldc) {
  v8 s[4][8];
  const int kv = k & ~7;
  for (int q = 0; q < r; q++)
    for (int i = 0; i < g; i++) s[q][i] = (v8){0};
  for (int p = 0; p < kv; p += 8) {
    v8 u[4];
    for (int q = 0; q < r; q++) u[q] = load8(w + (long)q * ldb + p);
    for (int i = 0; i < g; i++) {
      v8 xv = load8(x + (long)i * lda + p);
      for (int q = 0; q < r; q++) s[q][i] += xv * u[q];
    }
  }
  for (int q = 0; q < r; q++)
    for (int i = 0; i < g; i++) {
      float dot = sum8(s[q][i]);
      for (int p = kv; p < k; p++) dot += x[(long)i * lda + p] * w[(long)q * ldb + p];
      store(c + (long)i * ldc + q, dot, alpha, beta);
    }
}

/* Columns j0..j1 of C for g activation rows, r weight rows at a time. */
#define TILES(R, G)                                                                          \
  static void tiles_##R##_##G(int j0, int j1, int k, float alpha, const float *x, int lda,  \
                              const float *b, int ldb, float beta, float *c, int ldc) {     \
    int j = j0;                                                                             \
    for (; j + (R) <= j1; j += (R))                                                         \
      tile(R, G, k, alpha, x, lda, b + (long)j * ldb, ldb, beta, c + j, ldc);               \
    for (; j < j1; j++) tile(1, G, k, alpha, x, lda, b + (long)j * ldb, ldb, beta, c + j, ldc); \
  }
TILES(4, 1)
TILES(4, 2)
TILES(1, 5)
TILES(1, 6)
TILES(1, 7)
TILES(1, 8)

typedef void (*tiles_fn)(int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

/* Columns j0..j1 of C. 5 to 8 activation rows take one pass over the weights with a weight row
 * against all of them (measured fastest from memory: one weight stream, each value used g
 * times); fewer take 4 weight rows against 2 or 1 activation rows (enough accumulators to
 * hide the FMA latency). */
static void small_nt_cols(int m, int j0, int j1, int k, float alpha, const float *a, int lda,
                          const float *b, int ldb, float beta, float *c, int ldc) {
  static const tiles_fn wide[9] = {0, 0, 0, 0, 0, tiles_1_5, tiles_1_6, tiles_1_7, tiles_1_8};
  for (int i = 0; i < m;) {
    int left = m - i, g = left >= 5 ? (left < 8 ? left : 8) : (left >= 2 ? 2 : 1);
    tiles_fn run = g >= 5 ? wide[g] : g == 2 ? tiles_4_2 : tiles_4_1;
    run(j0, j1, k, alpha, a + (long)i * lda, lda, b, ldb, beta, c + (long)i * ldc, ldc);
    i += g;
  }
}

/* The columns go out in blocks that the threads take as they come free (OpenMP's dynamic
 * schedule), 8 per thread: a thread that loses its core for a while (to another process, or to
 * this one's HTTP threads) delays the product by a block, not by its whole share. */
static void small_nt(int threads, int m, int n, int k, float alpha, const float *a, int lda,
                     const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef _OPENMP
  if (threads > 1) {
    int block = ((n + 8 * threads - 1) / (8 * threads) + 3) & ~3; /* whole tiles of 4 */
    if (block < 16) block = 16;
    int blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < blocks; i++) {
      int j0 = i * block, j1 = j0 + block < n ? j0 + block : n;
      small_nt_cols(m, j0, j1, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    return;
  }
#endif
  (void)threads;
  small_nt_cols(m, 0, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemv_route_set_small(int m) { small_m = m; }

int gemv_route_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* ---- one thread pool: a large product split between OpenMP's threads ---- */

static int omp_split = 1; /* 0: OpenBLAS threads its own large products */

/* Row-major C = alpha op(A) op(B) + beta C in blocks of C's columns (or of its rows, when C is
 * taller than wide), which OpenMP's threads take as they come free, each running OpenBLAS on
 * one thread. OpenBLAS's own threads would spin after every call beside OpenMP's, each pool
 * holding the core the other needs next (a decode step alternates between them). */
static void split_sgemm(int threads, int ta, int tb, int m, int n, int k, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta, float *c,
                        int ldc) {
#ifdef _OPENMP
  int by_cols = n >= m, extent = by_cols ? n : m;
  int block = ((extent + 2 * threads - 1) / (2 * threads) + 15) & ~15;
  int blocks = (extent + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int i = 0; i < blocks; i++) {
    int s = i * block, w = extent - s < block ? extent - s : block;
    if (by_cols)
      real_sgemm(ROW_MAJOR, ta, tb, m, w, k, alpha, a, lda,
                 tb == TRANS ? b + (long)s * ldb : b + s, ldb, beta, c + s, ldc);
    else
      real_sgemm(ROW_MAJOR, ta, tb, w, n, k, alpha, ta == TRANS ? a + s : a + (long)s * lda,
                 lda, b, ldb, beta, c + (long)s * ldc, ldc);
  }
#else
  (void)threads;
  real_sgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

void gemv_route_set_split(int on) { omp_split = on; }

int gemv_route_pooled(void) { return omp_split && gemv_route_openmp(); }

/* Row-major sgemm on `threads` threads: OpenMP's, or OpenBLAS's when not pooled. */
static void row_sgemm(int threads, int ta, int tb, int m, int n, int k, float alpha,
                      const float *a, int lda, const float *b, int ldb, float beta, float *c,
                      int ldc) {
  if (threads > 1 && gemv_route_pooled()) {
    split_sgemm(threads, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    use_threads(gemv_route_pooled() ? 1 : threads);
    real_sgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

/* For attention.c: OpenBLAS's row-major sgemm on the calling thread (an OpenMP task's). */
void route_sgemm_serial(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                        const float *b, int ldb, float beta, float *c, int ldc) {
  real_sgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void route_blas_single_thread(void) { use_threads(1); }

static int flip(int trans) { return trans == TRANS ? NO_TRANS : TRANS; }

/* Row-major C[m,n] = alpha op(A) op(B) + beta C for a few rows m: computed as
 * T[w,m] = op(B)^T op(A)^T, a panel of w columns at a time (so a large B, an LM head, is taken
 * in cache-sized pieces), then C = T^T + beta C. 0 on success, -1 without memory. */
static int skinny(int threads, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  long width = skinny_max_elems / (k > 0 ? k : 1);
  if (width > n) width = n;
  if (width < 1) width = 1;
  float *t = malloc(sizeof(float) * (size_t)m * width);
  if (!t) return -1;
  for (long j0 = 0; j0 < n; j0 += width) {
    int w = (int)(n - j0 < width ? n - j0 : width);
    const float *panel = tb == TRANS ? b + j0 * ldb : b + j0; /* op(B)'s columns j0.. */
    row_sgemm(threads, flip(tb), flip(ta), w, m, k, alpha, panel, ldb, a, lda, 0.0f, t, m);
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
  /* A decode step's projections: a few activation rows against a weight stored as rows. */
  int threads = (long)m * n * k >= gemv_split_elems ? gemm_threads : 1;
  if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && m <= small_m && n >= 4) {
    small_nt(threads, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    routed_calls++;
    return;
  }
  if (order == ROW_MAJOR && (m == 1 || n == 1) && beta == 0.0f) {
    /* BLAS may scale c by beta instead of ignoring it, and 0 * NaN is NaN: MLX's output
     * buffer is uninitialised, so clear it first. */
    if (m == 1) memset(c, 0, sizeof(float) * n);
    else for (int i = 0; i < m; i++) c[(long)i * ldc] = 0.0f;
  }
  /* Small products (a decode step's attention: a few rows against one row's keys) run on
   * one thread: waking the others costs more than the product. */
  use_threads(gemv_route_pooled() ? 1 : threads);
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
             skinny(threads, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0) {
    routed_calls++;
  } else if (order == ROW_MAJOR) {
    row_sgemm(threads, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else { /* column-major C is row-major C^T = op(B)^T op(A)^T */
    row_sgemm(threads, trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  }
}
