"""A small C kernel for paged attention on the CPU, compiled at first use and cached.

Why C: in plain torch a decode step must gather each request's blocks out of the cache
(and copy them again into a matmul layout) before it can attend. The kernel instead walks
each request's block table and reads every K/V row where it lies in the cache, once:
scores for all of the request's queries of one KV head (GQA: the query heads of a group
share each loaded key), a softmax per query, then the weighted sum of the V rows. It
copies nothing and allocates only per-thread score buffers.

Why plain C through ctypes, not a torch C++ extension: no torch headers means it builds in
about a second with the system C compiler (a torch extension takes a minute here), and no
ABI coupling to the torch build. Threads: OpenMP, the same runtime torch itself loaded
(libgomp is resolved by soname to the copy torch bundles, so there is one thread pool),
with dynamic scheduling so that on a shared, oversubscribed machine one preempted thread
does not hold up the others. The number of threads is `threads()`: by default torch's
intra-op count; the runner may give the kernel more (it is memory-bound and dynamically
scheduled, where torch's static GEMM partitions are not). The kernel's count is a clause of
its own parallel region: torch's intra-op setting is left as it is.

The build is cached under $AIOSCHED_CACHE_DIR (default ~/.cache/aiosched)/cpu_kernels/, keyed by the
source, compiler, flags and the CPU's feature flags (it is built with -march=native).
No compiler, a failed build or AIOSCHED_CPU_ATTENTION=torch: `load()` returns None and
the caller uses the plain-torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("aiosched.worker")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

/* exp(x) for the softmax's x = score - row max <= 0, in a form the compiler vectorizes
   (glibc's expf is a scalar call per score): e^x = 2^n * e^r, n = round(x log2 e), r reduced
   in two steps (Cody-Waite), e^r by Cephes' degree-6 polynomial (about 1 ulp). Below -87
   (e^-87 ~ 1.6e-38, the normal range's end), -inf included (a masked score): exactly 0. */
static inline float exp_le0(float x) {
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)(x < -87.f ? 0.f : n) + 127) << 23;
    return x < -87.f ? 0.f : p * two_n.f;
}

/* The softmax numerators of one score row in place; returns 1 / their sum. */
static inline float softmax_row(float *row, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; i++) mx = row[i] > mx ? row[i] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) { row[i] = exp_le0(row[i] - mx); sum += row[i]; }
    return 1.f / sum;
}

/* One work item: request r, KV head h, its query tokens [j0, j1). */
typedef struct { int64_t r, h, j0, j1; } item_t;

/* out[j] = scale * <q, k[j]> for 8 rows k[j] of D floats. AVX2: eight accumulators and one
   transposing reduction (instead of a horizontal sum per dot product); D % 8 == 0. */
static inline void dot8(const float *restrict q, const float *const k[8], int64_t D, float scale, float *restrict out) {
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + d), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[4] + d), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[5] + d), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[6] + d), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[7] + d), a7);
        }
        const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)); /* lanes: low, high halves */
        const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
        _mm256_storeu_ps(out, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
        return;
    }
#endif
    for (int j = 0; j < 8; j++) out[j] = scale * dot(q, k[j], D);
}

static void attend_item(const item_t *it, const float *q, float *out, const float *kc, const float *vc,
                        const int32_t *tables, const int64_t *seq_lens, const int64_t *qsl,
                        int64_t max_blocks, int64_t Hq, int64_t Hkv, int64_t D, int64_t BS,
                        float scale, int64_t window, float *S, float *acc) {
    const int64_t G = Hq / Hkv, r = it->r, h = it->h, j0 = it->j0, j1 = it->j1;
    const int64_t qlen = qsl[r + 1] - qsl[r], first = seq_lens[r] - qlen; /* query j sits at first + j */
    const int64_t hi = first + j1;                                           /* keys [lo, hi) */
    int64_t lo = 0;
    if (window > 0) { lo = first + j0 - window + 1; if (lo < 0) lo = 0; }
    const int64_t n = hi - lo, M = (j1 - j0) * G;
    const int32_t *table = tables + r * max_blocks;
#define KROW(c, p) ((c) + (((int64_t)table[(p) / BS] * BS + (p) % BS) * Hkv + h) * D)
#define QROW(m) (q + ((qsl[r] + j0 + (m) / G) * Hq + h * G + (m) % G) * D)
    /* scores S[m][p - lo]; row m = (token j0 + m / G, query head h * G + m % G); query m sees
       the keys [vlo, qpos]. Keys 8 at a time (dot8, the 8 rows stay in L1 across the tile's
       queries); a group no key of which a query sees is skipped, a partly seen one masked. */
    int64_t p = lo;
    for (; p + 8 <= hi; p += 8) {
        const float *kp[8];
        for (int j = 0; j < 8; j++) kp[j] = KROW(kc, p + j);
        for (int64_t m = 0; m < M; m++) {
            const int64_t qpos = first + j0 + m / G, vlo = window > 0 ? qpos - window + 1 : 0;
            float *srow = S + m * n + (p - lo);
            if (p > qpos || p + 7 < vlo) {
                for (int j = 0; j < 8; j++) srow[j] = -INFINITY;
                continue;
            }
            dot8(QROW(m), kp, D, scale, srow);
            if (p + 7 > qpos || p < vlo)
                for (int j = 0; j < 8; j++)
                    if (p + j > qpos || p + j < vlo) srow[j] = -INFINITY;
        }
    }
    for (; p < hi; p++) {
        const float *kp = KROW(kc, p);
        for (int64_t m = 0; m < M; m++) {
            const int64_t qpos = first + j0 + m / G;
            float s = -INFINITY;
            if (p <= qpos && (window <= 0 || p > qpos - window)) s = scale * dot(QROW(m), kp, D);
            S[m * n + (p - lo)] = s;
        }
    }
    for (int64_t m = 0; m < M; m++) acc[M * D + m] = softmax_row(S + m * n, n); /* the sum divides at the end */
    memset(acc, 0, sizeof(float) * M * D);
    for (p = lo; p < hi; p++) {
        const float *vp = KROW(vc, p);
        for (int64_t m = 0; m < M; m++) {
            const float w = S[m * n + (p - lo)];
            if (w == 0.f) continue; /* masked (causal tail of an earlier query) */
            float *a = acc + m * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) a[d] += w * vp[d];
        }
    }
    for (int64_t m = 0; m < M; m++) {
        float *o = out + ((qsl[r] + j0 + m / G) * Hq + h * G + m % G) * D;
        const float *a = acc + m * D, inv = acc[M * D + m];
        for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv;
    }
#undef KROW
#undef QROW
}

/* One query of request r (a decode row), every head: the cache is read position by position,
   each position's [Hkv, D] K (then V) row whole and in order (a block's rows are contiguous),
   so the prefetcher streams it; per head, the scores S[hq][p - lo]. */
static void attend_decode(int64_t r, const float *q, float *out, const float *kc, const float *vc,
                          const int32_t *tables, const int64_t *seq_lens, const int64_t *qsl,
                          int64_t max_blocks, int64_t Hq, int64_t Hkv, int64_t D, int64_t BS,
                          float scale, int64_t window, float *S, float *acc) {
    const int64_t G = Hq / Hkv, hi = seq_lens[r], row = Hkv * D;
    int64_t lo = 0;
    if (window > 0) { lo = hi - window; if (lo < 0) lo = 0; }
    const int64_t n = hi - lo;
    const int32_t *table = tables + r * max_blocks;
    const float *qr = q + qsl[r] * Hq * D;
#define SLOT(p) (((int64_t)table[(p) / BS] * BS + (p) % BS) * row)
    int64_t p = lo;
    for (; p + 8 <= hi; p += 8) { /* 8 positions at a time: their rows stay in L1 across the heads */
        const float *kp[8], *kh[8];
        for (int j = 0; j < 8; j++) kp[j] = kc + SLOT(p + j);
        for (int64_t m = 0; m < Hq; m++) {
            for (int j = 0; j < 8; j++) kh[j] = kp[j] + (m / G) * D;
            dot8(qr + m * D, kh, D, scale, S + m * n + (p - lo));
        }
    }
    for (; p < hi; p++) {
        const float *kp = kc + SLOT(p);
        for (int64_t m = 0; m < Hq; m++) S[m * n + (p - lo)] = scale * dot(qr + m * D, kp + (m / G) * D, D);
    }
    for (int64_t m = 0; m < Hq; m++) acc[Hq * D + m] = softmax_row(S + m * n, n);
    memset(acc, 0, sizeof(float) * Hq * D);
    for (p = lo; p < hi; p++) {
        const float *vp = vc + SLOT(p);
        for (int64_t m = 0; m < Hq; m++) {
            const float w = S[m * n + (p - lo)], *vm = vp + (m / G) * D;
            float *a = acc + m * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) a[d] += w * vm[d];
        }
    }
    float *o = out + qsl[r] * Hq * D;
    for (int64_t m = 0; m < Hq; m++) {
        const float inv = acc[Hq * D + m];
        for (int64_t d = 0; d < D; d++) o[m * D + d] = acc[m * D + d] * inv;
    }
}
#undef SLOT

/* q, out: [T, Hq, D]; kc, vc: [num_blocks, BS, Hkv, D]; tables: [B, max_blocks] int32;
   seq_lens: [B]; qsl: [B + 1]. All contiguous float32 / int. Returns 0, or 1 if out of memory. */
int aiosched_paged_attention_f32(const float *q, float *out, const float *kc, const float *vc,
                                 const int32_t *tables, const int64_t *seq_lens, const int64_t *qsl,
                                 int64_t B, int64_t max_blocks, int64_t Hq, int64_t Hkv, int64_t D, int64_t BS,
                                 float scale, int64_t window, int64_t q_tile, int nthreads) {
    const int64_t G = Hq / Hkv;
    int64_t n_items = 0, max_len = 1;
    for (int64_t r = 0; r < B; r++) {
        const int64_t qlen = qsl[r + 1] - qsl[r];
        n_items += qlen == 1 ? 1 : Hkv * ((qlen + q_tile - 1) / q_tile);
        if (seq_lens[r] > max_len) max_len = seq_lens[r];
    }
    item_t *items = malloc(sizeof(item_t) * (n_items ? n_items : 1));
    if (!items) return 1;
    int64_t k = 0;
    for (int64_t r = 0; r < B; r++) {
        const int64_t qlen = qsl[r + 1] - qsl[r];
        if (qlen == 1) { item_t it = {r, -1, 0, 1}; items[k++] = it; continue; }
        for (int64_t j0 = 0; j0 < qlen; j0 += q_tile)
            for (int64_t h = 0; h < Hkv; h++) {
                item_t it = {r, h, j0, j0 + q_tile < qlen ? j0 + q_tile : qlen};
                items[k++] = it;
            }
    }
    const int64_t max_m = q_tile * G > Hq ? q_tile * G : Hq; /* a decode item holds every head's scores */
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    /* num_threads, not omp_set_num_threads: the calling thread's OpenMP setting is torch's
       intra-op thread count, which this kernel's own count must not change */
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n_items > 1)
    {
        float *S = malloc(sizeof(float) * max_m * max_len);
        float *acc = malloc(sizeof(float) * max_m * (D + 1));
        if (!S || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items; i++)
            if (S && acc && items[i].h < 0)
                attend_decode(items[i].r, q, out, kc, vc, tables, seq_lens, qsl, max_blocks, Hq, Hkv, D, BS, scale, window, S, acc);
            else if (S && acc)
                attend_item(&items[i], q, out, kc, vc, tables, seq_lens, qsl, max_blocks, Hq, Hkv, D, BS,
                            scale, window, S, acc);
        free(S);
        free(acc);
    }
    free(items);
    return failed;
}

/* Rotate-half RoPE (HF's convention) of q and k, and this step's k, v written into the paged
   cache, in one pass (the layers' unfused path: a cos/sin gather, 2 x 7 elementwise ops and
   two index_copy_). q, k, v: rows of T tokens, row strides qs, ks, vs (views of the fused
   qkv output), heads contiguous ([H, D] per token); table: [max_pos, D] float32, cos in the
   first half and sin in the second; pos: [T]; slots: [T] cache slot (-1: no write).
   qo: [T, Hq, D], ko: [T, Hkv, D] contiguous, the rotated q and k. Products and sums are
   rounded one by one (no FMA contraction), so the result is torch's, bit for bit. */
__attribute__((optimize("fp-contract=off")))
static void rope_row(const float *restrict x, float *restrict o, const float *restrict cs, int64_t D) {
    const int64_t h = D / 2;
    const float *c = cs, *sn = cs + h;
    for (int64_t i = 0; i < h; i++) {
        const float x1 = x[i], x2 = x[h + i];
        const float a = x1 * c[i], b = x2 * sn[i], e = x2 * c[i], f = x1 * sn[i];
        o[i] = a - b;
        o[h + i] = e + f;
    }
}

void aiosched_rope_store_f32(const float *q, const float *k, const float *v, int64_t qs, int64_t ks, int64_t vs,
                             float *qo, float *ko, float *kc, float *vc, const float *table, const int64_t *pos,
                             const int64_t *slots, int64_t T, int64_t Hq, int64_t Hkv, int64_t D) {
    for (int64_t t = 0; t < T; t++) {
        const float *cs = table + pos[t] * D;
        for (int64_t hh = 0; hh < Hq; hh++) rope_row(q + t * qs + hh * D, qo + (t * Hq + hh) * D, cs, D);
        for (int64_t hh = 0; hh < Hkv; hh++) rope_row(k + t * ks + hh * D, ko + (t * Hkv + hh) * D, cs, D);
        if (slots[t] >= 0) {
            memcpy(kc + slots[t] * Hkv * D, ko + t * Hkv * D, sizeof(float) * Hkv * D);
            for (int64_t hh = 0; hh < Hkv; hh++) memcpy(vc + (slots[t] * Hkv + hh) * D, v + t * vs + hh * D, sizeof(float) * D);
        }
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_loaded: "ctypes.CDLL | None | bool" = False  # False: not tried yet; None: unavailable


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    base = os.environ.get("AIOSCHED_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aiosched")
    return Path(base) / "cpu_kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([_SOURCE, cc, *version, *_FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"paged_attention_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "paged_attention.c", Path(tmp) / "paged_attention.so"
        src.write_text(_SOURCE)
        res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: concurrent builders (test workers) agree on one file
    return out


def _open(path: Path) -> ctypes.CDLL:
    import torch  # noqa: F401  torch's libgomp must be loaded first: the kernel then binds to it by soname

    lib = ctypes.CDLL(str(path))
    fn = lib.aiosched_paged_attention_f32
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr] * 7 + [i64] * 6 + [ctypes.c_float, i64, i64, ctypes.c_int]
    rope = lib.aiosched_rope_store_f32
    rope.restype = None
    rope.argtypes = [ptr] * 3 + [i64] * 3 + [ptr] * 7 + [i64] * 4
    return lib


THREADS_ENV = "AIOSCHED_CPU_ATTENTION_THREADS"
_threads: int | None = None


def set_threads(n: int | None) -> None:
    """The kernel's thread count from now on (None: torch's intra-op count, the default)."""
    global _threads
    _threads = n


def threads() -> int:
    """Threads per kernel call: $AIOSCHED_CPU_ATTENTION_THREADS, else `set_threads`'s, else
    torch.get_num_threads(). The work items are scheduled dynamically, so a thread that the
    OS preempts holds up at most the item it is on."""
    import torch

    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    return _threads or torch.get_num_threads()


def load() -> "ctypes.CDLL | None":
    """The compiled kernel library, or None where it cannot be used (see the module doc)."""
    global _loaded
    if _loaded is not False:
        return _loaded  # type: ignore[return-value]
    with _lock:
        if _loaded is not False:
            return _loaded  # type: ignore[return-value]
        lib = None
        if os.environ.get("AIOSCHED_CPU_ATTENTION", "auto") == "torch":
            log.info("AIOSCHED_CPU_ATTENTION=torch: paged attention on the CPU uses the plain-torch path")
        elif (cc := _compiler()) is None:
            log.warning("no C compiler found (cc, gcc, clang or $CC): paged attention on the CPU uses the slower plain-torch path")
        else:
            try:
                lib = _open(_build(cc))
            except Exception as e:  # noqa: BLE001  any build/load failure: the torch path still works
                log.warning("the CPU paged-attention kernel did not build (%s): using the slower plain-torch path", e)
        _loaded = lib
        return lib
