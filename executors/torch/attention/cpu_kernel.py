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
does not hold up the others. The number of threads is the caller's torch.get_num_threads().

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

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

/* One work item: request r, KV head h, its query tokens [j0, j1). */
typedef struct { int64_t r, h, j0, j1; } item_t;

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
    /* scores S[m][p - lo]; row m = (token j0 + m / G, query head h * G + m % G) */
    for (int64_t p = lo; p < hi; p++) {
        const float *kp = kc + (((int64_t)table[p / BS] * BS + p % BS) * Hkv + h) * D;
        for (int64_t m = 0; m < M; m++) {
            const int64_t qpos = first + j0 + m / G;
            float s = -INFINITY;
            if (p <= qpos && (window <= 0 || p > qpos - window)) {
                const float *qm = q + ((qsl[r] + j0 + m / G) * Hq + h * G + m % G) * D;
                s = scale * dot(qm, kp, D);
            }
            S[m * n + (p - lo)] = s;
        }
    }
    for (int64_t m = 0; m < M; m++) { /* softmax numerators; the sum divides at the end */
        float *row = S + m * n, mx = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < n; i++) mx = row[i] > mx ? row[i] : mx;
        for (int64_t i = 0; i < n; i++) { row[i] = expf(row[i] - mx); sum += row[i]; }
        acc[M * D + m] = 1.f / sum;
    }
    memset(acc, 0, sizeof(float) * M * D);
    for (int64_t p = lo; p < hi; p++) {
        const float *vp = vc + (((int64_t)table[p / BS] * BS + p % BS) * Hkv + h) * D;
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
    for (int64_t p = lo; p < hi; p++) {
        const float *kp = kc + ((int64_t)table[p / BS] * BS + p % BS) * row;
        for (int64_t m = 0; m < Hq; m++) S[m * n + (p - lo)] = scale * dot(qr + m * D, kp + (m / G) * D, D);
    }
    for (int64_t m = 0; m < Hq; m++) {
        float *srow = S + m * n, mx = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < n; i++) mx = srow[i] > mx ? srow[i] : mx;
        for (int64_t i = 0; i < n; i++) { srow[i] = expf(srow[i] - mx); sum += srow[i]; }
        acc[Hq * D + m] = 1.f / sum;
    }
    memset(acc, 0, sizeof(float) * Hq * D);
    for (int64_t p = lo; p < hi; p++) {
        const float *vp = vc + ((int64_t)table[p / BS] * BS + p % BS) * row;
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
    if (omp_get_max_threads() != nthreads) omp_set_num_threads(nthreads);
#pragma omp parallel if (nthreads > 1 && n_items > 1)
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
    return lib


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
