/* Causal attention of a prefill chunk on the CPU, in tiles that stay in cache.
 *
 * MLX's CPU attention materializes a chunk's whole (queries x positions) score matrix per head,
 * exponentiates it one element at a time on one thread, and reads it again for the values: a
 * 256-token chunk at position 4000 of SmolLM2 makes 9 x 256 x 4000 scores per layer. Here each
 * task (one KV head's group of query heads, a block of query positions) walks the keys in tiles:
 * scores of the block against a tile (OpenBLAS sgemm on this thread), a vectorized exp with the
 * running maximum and sum of each row (the online softmax of FlashAttention), and the tile's
 * values accumulated into the block's output (sgemm again). Nothing larger than a tile is
 * written, the query heads that share a KV head read each key tile once, and the tasks go to
 * OpenMP's threads, the same pool that runs the projections (gemv_route.c).
 *
 * Query i of the chunk sits at position offset + i and sees positions 0 .. offset + i.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

/* From gemv_route.c: OpenBLAS's row-major sgemm on the calling thread. */
void route_sgemm_serial(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                        const float *b, int ldb, float beta, float *c, int ldc);
void route_blas_single_thread(void);

enum { NO_TRANS = 111, TRANS = 112 };

static int key_tile = 256;  /* keys per tile */
static int query_rows = 192; /* query rows (heads x positions) per task, at most */

void attention_set_tiles(int keys, int rows) {
  if (keys >= 8) key_tile = keys & ~7;
  if (rows >= 1) query_rows = rows;
}

static float row_max(const float *s, int n) {
  v8 m = splat(-INFINITY);
  int j = 0;
  for (; j + 8 <= n; j += 8) m = vmax(m, load8(s + j));
  float best = -INFINITY;
  for (int i = 0; i < 8; i++) best = m[i] > best ? m[i] : best;
  for (; j < n; j++) best = s[j] > best ? s[j] : best;
  return best;
}

/* s[j] = e^(s[j] - top) for j < n; returns their sum. */
static float exp_row(float *s, int n, float top) {
  v8 sum = splat(0.0f), t = splat(top);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    v8 e = exp8(load8(s + j) - t);
    store8(s + j, e);
    sum += e;
  }
  if (j < n) { /* the tail through a padded vector, so every term takes the same exp */
    float pad[8];
    int left = n - j;
    for (int i = 0; i < 8; i++) pad[i] = i < left ? s[j + i] : top;
    v8 e = exp8(load8(pad) - t);
    for (int i = 0; i < left; i++) {
      s[j + i] = e[i];
      sum[i] += e[i];
    }
  }
  return sum8(sum);
}

typedef struct {
  int heads, kv_heads, length, positions, dim, offset;
  const float *q, *k, *v;
  long qs[3], ks[3], vs[3]; /* element strides of batch, head, position; the last axis is 1 */
  float scale;
  float *out; /* (batch, length, heads * dim), contiguous */
} Problem;

typedef struct {
  float *q, *s, *o, *top, *total; /* rows x dim, rows x key_tile, rows x dim, rows, rows */
} Scratch;

/* One tile's scores (rows x n, row stride key_tile) become probabilities against the running
 * maximum; rows whose query sees none of the tile are zeroed. `seen[r]`: keys of the tile that
 * row r may see. */
static void softmax_tile(const Problem *p, Scratch *w, int rows, int n, const int *seen) {
  for (int r = 0; r < rows; r++) {
    float *s = w->s + (long)r * key_tile, *o = w->o + (long)r * p->dim;
    int vis = seen[r] < n ? seen[r] : n;
    if (vis <= 0) {
      memset(s, 0, sizeof(float) * n);
      continue;
    }
    float top = row_max(s, vis);
    if (top < w->top[r]) top = w->top[r];
    float keep = expf(w->top[r] - top); /* 0 on the first tile (-inf) */
    w->total[r] = w->total[r] * keep + exp_row(s, vis, top);
    w->top[r] = top;
    memset(s + vis, 0, sizeof(float) * (n - vis));
    if (keep != 1.0f)
      for (int d = 0; d < p->dim; d++) o[d] *= keep;
  }
}

/* Query positions i0 .. i0 + count of batch row b, for the query heads of KV head g. Rows of
 * the block are head-major: row hh * count + ii is head g * rep + hh at position i0 + ii. */
static void attend_block(const Problem *p, Scratch *w, int b, int g, int i0, int count) {
  int rep = p->heads / p->kv_heads, rows = rep * count, dim = p->dim;
  int seen[rows > 0 ? rows : 1];
  for (int hh = 0; hh < rep; hh++)
    for (int ii = 0; ii < count; ii++) {
      const float *src = p->q + b * p->qs[0] + (long)(g * rep + hh) * p->qs[1] +
                         (long)(i0 + ii) * p->qs[2];
      float *dst = w->q + (long)(hh * count + ii) * dim;
      for (int d = 0; d < dim; d++) dst[d] = src[d] * p->scale;
    }
  for (int r = 0; r < rows; r++) w->top[r] = -INFINITY, w->total[r] = 0.0f;
  memset(w->o, 0, sizeof(float) * rows * dim);
  const float *keys = p->k + b * p->ks[0] + g * p->ks[1];
  const float *values = p->v + b * p->vs[0] + g * p->vs[1];
  int end = p->offset + i0 + count; /* one past the last position the block's queries see */
  if (end > p->positions) end = p->positions;
  for (int j0 = 0; j0 < end; j0 += key_tile) {
    int n = end - j0 < key_tile ? end - j0 : key_tile;
    route_sgemm_serial(NO_TRANS, TRANS, rows, n, dim, 1.0f, w->q, dim, keys + j0 * p->ks[2],
                       (int)p->ks[2], 0.0f, w->s, key_tile);
    for (int r = 0; r < rows; r++) seen[r] = p->offset + i0 + r % count + 1 - j0;
    softmax_tile(p, w, rows, n, seen);
    route_sgemm_serial(NO_TRANS, NO_TRANS, rows, dim, n, 1.0f, w->s, key_tile,
                       values + j0 * p->vs[2], (int)p->vs[2], 1.0f, w->o, dim);
  }
  for (int hh = 0; hh < rep; hh++)
    for (int ii = 0; ii < count; ii++) {
      int r = hh * count + ii;
      float *dst = p->out + ((long)b * p->length + i0 + ii) * p->heads * dim +
                   (long)(g * rep + hh) * dim;
      for (int d = 0; d < dim; d++) dst[d] = w->o[(long)r * dim + d] / w->total[r];
    }
}

static int alloc_scratch(Scratch *w, int rows, int dim) {
  w->q = malloc(sizeof(float) * rows * dim);
  w->s = malloc(sizeof(float) * rows * key_tile);
  w->o = malloc(sizeof(float) * rows * dim);
  w->top = malloc(sizeof(float) * rows);
  w->total = malloc(sizeof(float) * rows);
  return w->q && w->s && w->o && w->top && w->total ? 0 : -1;
}

static void free_scratch(Scratch *w) {
  free(w->q), free(w->s), free(w->o), free(w->top), free(w->total);
}

/* q (batch, heads, length, dim), k and v (batch, kv_heads, positions, dim), each with the
 * given element strides (batch, head, position) and contiguous rows; out (batch, length,
 * heads * dim). positions = offset + length. 0 on success, -1 without memory, -2 for shapes
 * it does not take. */
int attention_prefill(int threads, int batch, int heads, int kv_heads, int length, int positions,
                      int dim, int offset, float scale, const float *q, const long *q_strides,
                      const float *k, const long *k_strides, const float *v,
                      const long *v_strides, float *out) {
  if (kv_heads <= 0 || heads % kv_heads || length <= 0 || dim <= 0 || offset < 0 ||
      positions != offset + length)
    return -2;
  Problem p = {heads, kv_heads, length, positions, dim, offset, q, k, v, {0}, {0}, {0},
               scale, out};
  memcpy(p.qs, q_strides, sizeof p.qs);
  memcpy(p.ks, k_strides, sizeof p.ks);
  memcpy(p.vs, v_strides, sizeof p.vs);
  int rep = heads / kv_heads;
  int count = query_rows / rep > 0 ? query_rows / rep : 1; /* query positions per task */
  if (count > length) count = length;
  int blocks = (length + count - 1) / count, tasks = batch * kv_heads * blocks;
  int failed = 0;
  route_blas_single_thread();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 1 ? threads : 1) reduction(| : failed)
#endif
  {
    Scratch w;
    int usable = alloc_scratch(&w, rep * count, dim) == 0;
    failed |= !usable;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    /* Every thread takes part in the loop (a worksharing construct); one without scratch
     * skips its tasks, and the call fails. Blocks later in the chunk see more keys: they go
     * out first. */
    for (int t = 0; t < tasks; t++) {
      int block = blocks - 1 - t % blocks, bg = t / blocks;
      int i0 = block * count, n = length - i0 < count ? length - i0 : count;
      if (usable) attend_block(&p, &w, bg / kv_heads, bg % kv_heads, i0, n);
    }
    free_scratch(&w);
  }
  (void)threads;
  return failed ? -1 : 0;
}
