/* 8-float vectors (GCC vector extensions) and a vectorized exp, shared by the routing
 * library's kernels. Built for the CPU at hand (-march=native) where the compiler allows. */
#ifndef SHARDCOMPUTE_VEC_H
#define SHARDCOMPUTE_VEC_H

#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v); /* an unaligned vector load */
  return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* The lanes' sum, in a fixed order (pairs, then pairs of pairs). */
static inline float sum8(v8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

/* mask ? a : b, lane by lane (C has no vector ?:, so it selects through the bits). */
static inline v8 select8(v8i mask, v8 a, v8 b) {
  return (v8)(((v8i)a & mask) | ((v8i)b & ~mask));
}

static inline v8 vmax(v8 a, v8 b) { return select8(a > b, a, b); }

/* e^x for x <= 0, to about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6
 * polynomial (Cephes' expf), times 2^n through the exponent bits. Below -87 the result is
 * clamped to e^-87 (1.6e-38): nothing beside a softmax row's largest term, e^0 = 1, or
 * beside the 1 of a sigmoid's 1 + e^-|x|. */
static inline v8 exp8(v8 x) {
  x = vmax(x, splat(-87.0f));
  const v8 shift = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v8 n = (x * splat(1.44269504088896341f) + shift) - shift;
  v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#endif
