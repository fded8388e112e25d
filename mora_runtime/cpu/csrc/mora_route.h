/*
 * MoRA routing + rank-1 value update of ONE token, for the torch extension's layer call
 * (expert_layer.cpp, which runs tokens in parallel). Plain C99, header-only (static inline).
 *
 * Semantics (docs/spec.md steps 2-6, inference), for a token with raw scores z = A x:
 *   visible   = slots i < N with visible[i] (NULL: all) and present[i] (NULL: all)
 *   s_i       = z_i / max(||z_visible||_2, 1e-12)
 *   kept      = the min(max(k, 2), N, |visible|) visible slots with the largest s
 *               (largest first; equal scores: lower slot first)
 *   w         = softmax(s_kept / tau);  w_i = 0 where s_i < threshold   (no renormalising)
 *   y        += sum_{i in kept} w_i * z_i * slot_scale[i] * B[i]
 * The kept list is sorted, so the experts that pass the threshold are a prefix of it: only
 * that prefix touches B.
 */
#ifndef MORA_ROUTE_H
#define MORA_ROUTE_H

#include <math.h>
#include <stdint.h>

#define MORA_MAX_K 256
#define MORA_NORM_EPS 1e-12f
#define MORA_MIN_TOP_K 2

/* k_eff of a token of sequence s: the budget, at least 2, at most N. */
static inline int64_t mora_budget(const int64_t *top_k, int64_t s, int64_t default_k, int64_t N) {
    int64_t k = top_k ? top_k[s] : default_k;
    if (k < MORA_MIN_TOP_K) k = MORA_MIN_TOP_K;
    return k > N ? N : k;
}

/* Routes one token (k <= MORA_MAX_K, checked by the caller) and adds its delta to y (O
 * floats). Writes the slots that contributed, best first, into active_slots; returns how
 * many. */
static inline int64_t mora_route_token(const float *z, int64_t N, const float *B, int64_t O,
                                       float *y, const uint8_t *visible,
                                       const uint8_t *present, int64_t k, float threshold,
                                       float inv_tau, const float *slot_scale,
                                       int64_t *active_slots) {
    float kept_z[MORA_MAX_K];
    int64_t kept_slot[MORA_MAX_K];
    float weight[MORA_MAX_K];

    /* One pass: the squared norm over visible slots and a sorted top-k by raw score (the
       norm is a positive per-token scalar, so z and s rank experts alike). */
    float sq = 0.0f;
    int64_t n_kept = 0;
    for (int64_t i = 0; i < N; ++i) {
        if ((visible && !visible[i]) || (present && !present[i])) continue;
        const float v = z[i];
        sq += v * v;
        if (n_kept == k && !(v > kept_z[k - 1])) continue;
        int64_t j = n_kept < k ? n_kept++ : k - 1;
        while (j > 0 && kept_z[j - 1] < v) {
            kept_z[j] = kept_z[j - 1];
            kept_slot[j] = kept_slot[j - 1];
            --j;
        }
        kept_z[j] = v;
        kept_slot[j] = i;
    }
    if (n_kept == 0) return 0;
    float norm = sqrtf(sq);
    if (norm < MORA_NORM_EPS) norm = MORA_NORM_EPS;
    const float inv_norm = 1.0f / norm;

    /* Softmax over every kept expert (pruned ones included), then the prefix that passes
       the threshold. */
    const float peak = kept_z[0] * inv_norm * inv_tau;
    float total = 0.0f;
    for (int64_t j = 0; j < n_kept; ++j) {
        weight[j] = expf(kept_z[j] * inv_norm * inv_tau - peak);
        total += weight[j];
    }
    int64_t n_active = 0;
    while (n_active < n_kept && kept_z[n_active] * inv_norm >= threshold) ++n_active;

    for (int64_t j = 0; j < n_active; ++j) {
        const int64_t slot = kept_slot[j];
        const float c = weight[j] / total * kept_z[j] * slot_scale[slot];
        const float *b = B + slot * O;
        for (int64_t o = 0; o < O; ++o) y[o] += c * b[o];
        active_slots[j] = slot;
    }
    return n_active;
}

#endif /* MORA_ROUTE_H */
