/*
 * emakit's native CPU kernels: one call updates every tensor of a group.
 *
 * Built on first use by emakit.backends.torch.native with the system C compiler and OpenMP
 * (the same libgomp torch loaded, so the two share one thread pool), cached on disk, and
 * called through ctypes. Without a compiler emakit runs torch's eager kernels instead.
 *
 * A group is k tensors given as two tables of addresses and a table of prefix sums of their
 * sizes (prefix[0] = 0, prefix[k] = total). The total is cut into one equal, 64-byte aligned
 * stretch per thread, so tensors of any sizes keep every thread equally busy.
 *
 *   emakit_lerp   shadow <- lerp(shadow, source, w) with torch's rounding (bitwise equal to
 *                 Tensor.lerp_ on CPU): |w| < 0.5: fma(w, x - s, s); else fma(w - 1, x - s, x),
 *                 as torch's vectorised body computes it. (Torch's scalar tail, the last few
 *                 elements of a piece, gives another sign to a zero result at w = 1: there
 *                 torch does not agree with itself, and these kernels follow the body.)
 *                 Sources in float32, bfloat16 or float16 into float32 shadows (converted
 *                 exactly on the fly), or float64 into float64. Several averages of one
 *                 source ("members", each with its weight) read each block of it once.
 *   emakit_guarded_lerp  the same, for the tensors whose sources are all finite and at most a
 *                 limit in magnitude; the others are left as they are, and reported.
 *   emakit_peak   max |x| over every element, from the bit patterns (exact): NaN if any is NaN.
 *   emakit_copy   dst <- src, byte for byte.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

enum { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

#define ALIGN 64 /* elements per stretch boundary: whole cache lines for every element size */

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float from_f16(uint16_t h) { /* exact, for every pattern */
#ifdef __FLT16_MAX__
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t u;
    float f;
    if (em >= 0x7C00u) {
        u = sign | 0x7F800000u | (em & 0x3FFu) << 13;
    } else if (em >= 0x0400u) {
        u = sign | ((em << 13) + (112u << 23));
    } else {
        f = (float)em * 5.9604644775390625e-08f; /* a subnormal: em * 2^-24 */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

#define LERP_LOOP(S, X, N, W, CONVERT)                                              \
    do {                                                                            \
        if (fabs((double)(W)) < 0.5) {                                              \
            for (int64_t i = 0; i < (N); i++) (S)[i] = FMA((W), CONVERT((X)[i]) - (S)[i], (S)[i]); \
        } else {                                                                    \
            const __typeof__(W) c = (W) - 1;                                        \
            for (int64_t i = 0; i < (N); i++) {                                     \
                const __typeof__(W) e = CONVERT((X)[i]);                            \
                (S)[i] = FMA(c, e - (S)[i], e);                                     \
            }                                                                       \
        }                                                                           \
    } while (0)

#define SAME(v) (v)

static void lerp_piece(void *s, const void *x, int64_t n, int kind, double w) {
    if (kind == F64) {
#define FMA fma
        double *restrict sd = (double *)s;
        const double *restrict xd = (const double *)x;
        LERP_LOOP(sd, xd, n, w, SAME);
#undef FMA
        return;
    }
#define FMA fmaf
    float *restrict sf = (float *)s;
    const float wf = (float)w;
    if (kind == F32) {
        const float *restrict xf = (const float *)x;
        LERP_LOOP(sf, xf, n, wf, SAME);
    } else if (kind == BF16) {
        const uint16_t *restrict xb = (const uint16_t *)x;
        LERP_LOOP(sf, xb, n, wf, from_bf16);
    } else {
        const uint16_t *restrict xh = (const uint16_t *)x;
        LERP_LOOP(sf, xh, n, wf, from_f16);
    }
#undef FMA
}

static int element_size(int kind) {
    return kind == F64 ? 8 : kind == F32 ? 4 : 2;
}

/* The stretch [*lo, *hi) of the total for thread t of nt: equal, and cut at multiples of ALIGN. */
static void stretch(int64_t total, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t a = total / nt * t + (total % nt) * t / nt;
    int64_t b = total / nt * (t + 1) + (total % nt) * (t + 1) / nt;
    a = t == 0 ? 0 : a / ALIGN * ALIGN;
    b = t == nt - 1 ? total : b / ALIGN * ALIGN;
    *lo = a;
    *hi = b > a ? b : a;
}

/* The tensor holding element `at` of the concatenation: prefix[j] <= at < prefix[j + 1]. */
static int64_t first_tensor(const int64_t *prefix, int64_t k, int64_t at) {
    int64_t lo = 0, hi = k;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (prefix[mid] <= at) lo = mid; else hi = mid;
    }
    return lo;
}

/* Threads for `total` units of work: at most `threads`, and none with less than `grain`. */
static int team(int64_t total, int threads, int64_t grain) {
    int64_t most = total / grain;
    if (most < 1 || threads < 1) return 1;
    return most < threads ? (int)most : threads;
}

/* Every piece of every tensor inside the stretch of thread t of nt, given to BODY(j, a, n):
 * tensor j, its elements [a, a + n). */
#define FOR_PIECES(prefix, k, t, nt, ...)                                           \
    do {                                                                            \
        int64_t lo_, hi_;                                                           \
        stretch((prefix)[k], (t), (nt), &lo_, &hi_);                                \
        for (int64_t j = lo_ < hi_ ? first_tensor((prefix), (k), lo_) : (k);        \
             j < (k) && (prefix)[j] < hi_; j++) {                                   \
            int64_t a = lo_ > (prefix)[j] ? lo_ - (prefix)[j] : 0;                  \
            int64_t b = (hi_ < (prefix)[j + 1] ? hi_ : (prefix)[j + 1]) - (prefix)[j]; \
            if (b > a) { int64_t n = b - a; __VA_ARGS__; }                            \
        }                                                                           \
    } while (0)

/* Runs body(t, nt, args) on a team of nt threads (nt == 1: on this thread, no OpenMP). */
#define ON_TEAM(nt, CALL)                                                           \
    do {                                                                            \
        if ((nt) == 1) {                                                            \
            const int t = 0, nt_ = 1;                                               \
            CALL;                                                                   \
        } else {                                                                    \
            _Pragma("omp parallel num_threads(nt)")                                 \
            {                                                                       \
                const int t = omp_get_thread_num(), nt_ = omp_get_num_threads();    \
                CALL;                                                               \
            }                                                                       \
        }                                                                           \
    } while (0)

#define BLOCK 8192 /* elements of one source read once for all members (in L1/L2 after) */

typedef struct {
    int64_t k;
    int members;
    void *const *shadows; /* members * k: member i's tensor j at [i * k + j] */
    const void *const *sources;
    const int64_t *prefix;
    int kind;
    const double *weights;
} LerpJob;

static void lerp_stretch(const LerpJob *job, int t, int nt) {
    const int size = element_size(job->kind), shadow_size = job->kind == F64 ? 8 : 4;
    FOR_PIECES(job->prefix, job->k, t, nt, {
        for (int64_t c = 0; c < n; c += BLOCK) {
            const int64_t at = a + c, len = n - c < BLOCK ? n - c : BLOCK;
            const char *x = (const char *)job->sources[j] + at * size;
            for (int i = 0; i < job->members; i++)
                lerp_piece((char *)job->shadows[(int64_t)i * job->k + j] + at * shadow_size, x,
                           len, job->kind, job->weights[i]);
        }
    });
}

/* For each member i and tensor j: shadows[i * k + j] <- lerp(it, sources[j], weights[i]). */
void emakit_lerp(int64_t k, int members, void *const *shadows, const void *const *sources,
                 const int64_t *prefix, int kind, const double *weights, int threads) {
    const LerpJob job = {k, members, shadows, sources, prefix, kind, weights};
    const int nt = team(prefix[k], threads, 32768);
    ON_TEAM(nt, lerp_stretch(&job, t, nt_));
}

#define PEAK_LOOP(T, MASK, N, X, OUT)                                               \
    do {                                                                            \
        const T *restrict p = (const T *)(X);                                       \
        T top_ = 0;                                                                 \
        for (int64_t i = 0; i < (N); i++) {                                         \
            T v = p[i] & (MASK);                                                    \
            top_ = v > top_ ? v : top_;                                             \
        }                                                                           \
        (OUT) = (uint64_t)top_;                                                     \
    } while (0)

/* The largest |x| bit pattern of n elements (sign cleared): ordered like the magnitudes. */
static uint64_t peak_bits(const void *x, int64_t n, int kind) {
    uint64_t m = 0;
    if (kind == F64) PEAK_LOOP(uint64_t, 0x7FFFFFFFFFFFFFFFull, n, x, m);
    else if (kind == F32) PEAK_LOOP(uint32_t, 0x7FFFFFFFu, n, x, m);
    else PEAK_LOOP(uint16_t, (uint16_t)0x7FFF, n, x, m);
    return m;
}

static double from_bits(uint64_t m, int kind) {
    if (kind == F64) {
        double d;
        memcpy(&d, &m, sizeof d);
        return d;
    }
    if (kind == F32) {
        const uint32_t u = (uint32_t)m;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return kind == BF16 ? from_bf16((uint16_t)m) : from_f16((uint16_t)m);
}

static void peak_stretch(int64_t k, const void *const *xs, const int64_t *prefix, int kind,
                         int t, int nt, uint64_t *out) {
    const int size = element_size(kind);
    uint64_t best = 0;
    FOR_PIECES(prefix, k, t, nt, {
        const uint64_t m = peak_bits((const char *)xs[j] + a * size, n, kind);
        best = m > best ? m : best;
    });
    out[t] = best;
}

/* Per-thread results live on the caller's stack for teams up to SMALL_TEAM threads (a few
 * hundred bytes: safe on a thread with a small stack), on the heap for larger teams. */
#define SMALL_TEAM 16

/* Zeroed room for nt per-thread slots of `size` bytes: `small` (SMALL_TEAM slots) when it
 * fits, else the heap; on a failed allocation, the team shrinks to SMALL_TEAM. */
static void *slots(void *small, int *nt, size_t size) {
    if (*nt <= SMALL_TEAM) return small;
    void *room = calloc((size_t)*nt, size);
    if (room == NULL) *nt = SMALL_TEAM;
    return room == NULL ? small : room;
}

/* max |x| over every element of the k tensors: NaN if one is NaN (its pattern is the largest),
 * inf if one is infinite; 0.0 for none. */
double emakit_peak(int64_t k, const void *const *xs, const int64_t *prefix, int kind,
                   int threads) {
    uint64_t small[SMALL_TEAM] = {0};
    int nt = team(prefix[k], threads, 65536);
    uint64_t *best = slots(small, &nt, sizeof *best);
    ON_TEAM(nt, peak_stretch(k, xs, prefix, kind, t, nt_, best));
    uint64_t top = 0;
    for (int t = 0; t < nt; t++) top = best[t] > top ? best[t] : top;
    if (best != small) free(best);
    return from_bits(top, kind);
}

/* A tensor shared by several threads' stretches: this thread's piece of it, and its peak. */
typedef struct {
    int64_t tensor, at, count; /* tensor -1: none */
    uint64_t peak;
} Edge;

typedef struct {
    int64_t k;
    void *const *shadows;
    const void *const *sources;
    const int64_t *prefix;
    int kind;
    double w, limit;
    uint8_t *failed;
    Edge *edges;     /* 2 per thread: its first and its last piece, when only partly its own */
    uint64_t *folded; /* per thread: the largest source pattern folded in */
} GuardJob;

static void guard_piece(const GuardJob *job, int64_t j, int64_t a, int64_t n) {
    const int size = element_size(job->kind), shadow_size = job->kind == F64 ? 8 : 4;
    lerp_piece((char *)job->shadows[j] + a * shadow_size,
               (const char *)job->sources[j] + a * size, n, job->kind, job->w);
}

static int within(const GuardJob *job, uint64_t peak) {
    return from_bits(peak, job->kind) <= job->limit; /* false for NaN */
}

static void guard_stretch(const GuardJob *job, int t, int nt) {
    const int size = element_size(job->kind);
    Edge *mine = job->edges + 2 * t;
    uint64_t folded = 0;
    mine[0].tensor = mine[1].tensor = -1;
    /* first: tensors wholly in this stretch, checked and folded while they are in the caches;
     * the pieces of shared tensors only checked */
    FOR_PIECES(job->prefix, job->k, t, nt, {
        const uint64_t m = peak_bits((const char *)job->sources[j] + a * size, n, job->kind);
        if (a == 0 && n == job->prefix[j + 1] - job->prefix[j]) {
            if (within(job, m)) {
                guard_piece(job, j, a, n);
                folded = m > folded ? m : folded;
            } else {
                job->failed[j] = 1;
            }
        } else {
            Edge *e = mine[0].tensor < 0 ? &mine[0] : &mine[1];
            e->tensor = j;
            e->at = a;
            e->count = n;
            e->peak = m;
        }
    });
    if (nt > 1) {
        _Pragma("omp barrier")
    }
    /* then the shared tensors, once every thread has checked its piece of them */
    for (int side = 0; side < 2; side++) {
        const Edge *e = &mine[side];
        if (e->tensor < 0) continue;
        uint64_t whole = 0;
        for (int u = 0; u < 2 * nt; u++)
            if (job->edges[u].tensor == e->tensor && job->edges[u].peak > whole)
                whole = job->edges[u].peak;
        if (within(job, whole)) {
            guard_piece(job, e->tensor, e->at, e->count);
            folded = whole > folded ? whole : folded;
        } else if (e->at == 0) {
            job->failed[e->tensor] = 1; /* written by the thread holding the tensor's start */
        }
    }
    job->folded[t] = folded;
}

/* For each tensor j whose source values are all at most `limit` in magnitude (so finite):
 * shadows[j] <- lerp(shadows[j], sources[j], w); the others are left as they are and marked in
 * failed[j] (zeroed by the caller). Each tensor's source is read twice, the second time from the
 * caches where it fits. Returns the largest |x| folded in (0.0 for none). */
double emakit_guarded_lerp(int64_t k, void *const *shadows, const void *const *sources,
                           const int64_t *prefix, int kind, double w, double limit,
                           uint8_t *failed, int threads) {
    Edge small_edges[2 * SMALL_TEAM];
    uint64_t small_folded[SMALL_TEAM] = {0};
    int nt = team(prefix[k], threads, 32768), wanted = nt;
    uint64_t *folded = slots(small_folded, &nt, sizeof *folded);
    Edge *edges = slots(small_edges, &nt, 2 * sizeof *edges);
    if (nt < wanted && folded != small_folded) { /* the second allocation failed */
        free(folded);
        folded = small_folded;
    }
    const GuardJob job = {k, shadows, sources, prefix, kind, w, limit, failed, edges, folded};
    ON_TEAM(nt, guard_stretch(&job, t, nt_));
    uint64_t top = 0;
    for (int t = 0; t < nt; t++) top = folded[t] > top ? folded[t] : top;
    if (folded != small_folded) free(folded);
    if (edges != small_edges) free(edges);
    return from_bits(top, kind);
}

static void copy_stretch(int64_t k, void *const *dsts, const void *const *srcs,
                         const int64_t *prefix, int t, int nt) {
    FOR_PIECES(prefix, k, t, nt,
               memcpy((char *)dsts[j] + a, (const char *)srcs[j] + a, (size_t)n));
}

/* dsts[j] <- srcs[j], byte for byte; prefix counts bytes. */
void emakit_copy(int64_t k, void *const *dsts, const void *const *srcs, const int64_t *prefix,
                 int threads) {
    const int nt = team(prefix[k], threads, 1 << 20);
    ON_TEAM(nt, copy_stretch(k, dsts, srcs, prefix, t, nt_));
}

/* The ABI version: the loader refuses a cached library whose number differs. */
int emakit_kernels_version(void) { return 1; }
