/*
 * MoRA routing + rank-1 value update of one adapted layer, for CPU inference.
 *
 * Semantics (MORA_SPEC.md steps 2-6, inference), for every token t with raw scores z[t] = A x_t:
 *   visible(t) = slots i < N with mask[row(t)][i] (no mask: all) and present[i] (none: all)
 *   s_i       = z[t,i] / max(||z[t, visible(t)]||_2, 1e-12)
 *   kept      = the min(max(k_t, 2), N, |visible(t)|) visible slots with the largest s
 *               (largest first; equal scores: lower slot first)
 *   w         = softmax(s_kept / tau);  w_i = 0 where s_i < threshold_t   (no renormalising)
 *   y[t]     += sum_{i in kept} w_i * z[t,i] * slot_scale[i] * B[i]
 * The kept list is sorted, so the experts that pass the threshold are a prefix of it: only
 * that prefix touches B.
 *
 * Shapes (all row-major, contiguous rows): z [T, N] f32; B [N, O] f32; y [T, O] f32 with row
 * stride y_stride; mask [S, N] u8 (mask_rows = S, or 1 for one row shared by every token);
 * seq [T] i64 (token -> sequence; NULL: every token is sequence 0); present [N] u8;
 * top_k [S] i64 and threshold [S] f32 per sequence (NULL: the defaults); slot_scale [N] f32.
 * Outputs: active [T] i32 = experts that contributed to each token; hits [S, N] i64 (may be
 * NULL) += 1 per contributing (token, expert), counted only where valid[t] (NULL: all).
 *
 * Returns 0, or -1, having written nothing, when some token's k_eff exceeds MORA_MAX_K (the
 * caller then uses its general path).
 * One function call per layer replaces a dozen small tensor operations: at decode batch
 * sizes their fixed per-op cost, not arithmetic, is what the pool used to add per token.
 */
#include <math.h>
#include <stdint.h>

#define MORA_MAX_K 256
#define MORA_NORM_EPS 1e-12f
#define MORA_MIN_TOP_K 2

int mora_max_k(void) { return MORA_MAX_K; }

/* k_eff of a token of sequence s: the budget, at least 2, at most N. */
static int64_t budget(const int64_t *top_k, int64_t s, int64_t default_k, int64_t N) {
    int64_t k = top_k ? top_k[s] : default_k;
    if (k < MORA_MIN_TOP_K) k = MORA_MIN_TOP_K;
    return k > N ? N : k;
}

int mora_route_apply(const float *z, int64_t T, int64_t N, const float *B, int64_t O, float *y,
                     int64_t y_stride, const uint8_t *mask, int64_t mask_rows,
                     const int64_t *seq, const uint8_t *present, const int64_t *top_k,
                     int64_t default_k, const float *threshold, float default_threshold,
                     float tau, const float *slot_scale, const uint8_t *valid, int32_t *active,
                     int64_t *hits) {
    float kept_z[MORA_MAX_K];
    int64_t kept_slot[MORA_MAX_K];
    float weight[MORA_MAX_K];
    const float inv_tau = 1.0f / tau;

    /* Refuse before writing anything: a later token's budget must not leave y half-updated. */
    for (int64_t t = 0; t < T; ++t)
        if (budget(top_k, seq ? seq[t] : 0, default_k, N) > MORA_MAX_K) return -1;

    for (int64_t t = 0; t < T; ++t) {
        const int64_t s = seq ? seq[t] : 0;
        const float *zt = z + t * N;
        const uint8_t *visible = mask ? mask + (mask_rows == 1 ? 0 : s) * N : 0;
        const int64_t k = budget(top_k, s, default_k, N);
        const float thr = threshold ? threshold[s] : default_threshold;

        /* One pass: the squared norm over visible slots and a sorted top-k by raw score
           (the norm is a positive per-token scalar, so z and s rank experts alike). */
        float sq = 0.0f;
        int64_t n_kept = 0;
        for (int64_t i = 0; i < N; ++i) {
            if ((visible && !visible[i]) || (present && !present[i])) continue;
            const float v = zt[i];
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
        if (n_kept == 0) {
            active[t] = 0;
            continue;
        }
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
        while (n_active < n_kept && kept_z[n_active] * inv_norm >= thr) ++n_active;
        active[t] = (int32_t)n_active;

        float *yt = y + t * y_stride;
        for (int64_t j = 0; j < n_active; ++j) {
            const int64_t slot = kept_slot[j];
            const float c = weight[j] / total * kept_z[j] * slot_scale[slot];
            const float *b = B + slot * O;
            for (int64_t o = 0; o < O; ++o) yt[o] += c * b[o];
            if (hits && (!valid || valid[t])) hits[s * N + slot] += 1;
        }
    }
    return 0;
}
