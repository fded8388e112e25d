/*
 * MoRA routing + rank-1 value update of one adapted layer, for CPU inference: the plain C
 * library called through ctypes (native.py) where the torch extension is not built. The
 * per-token routing and its semantics are in mora_route.h.
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
#include "mora_route.h"

int mora_max_k(void) { return MORA_MAX_K; }

int mora_route_apply(const float *z, int64_t T, int64_t N, const float *B, int64_t O, float *y,
                     int64_t y_stride, const uint8_t *mask, int64_t mask_rows,
                     const int64_t *seq, const uint8_t *present, const int64_t *top_k,
                     int64_t default_k, const float *threshold, float default_threshold,
                     float tau, const float *slot_scale, const uint8_t *valid, int32_t *active,
                     int64_t *hits) {
    int64_t slots[MORA_MAX_K];
    const float inv_tau = 1.0f / tau;

    /* Refuse before writing anything: a later token's budget must not leave y half-updated. */
    for (int64_t t = 0; t < T; ++t)
        if (mora_budget(top_k, seq ? seq[t] : 0, default_k, N) > MORA_MAX_K) return -1;

    for (int64_t t = 0; t < T; ++t) {
        const int64_t s = seq ? seq[t] : 0;
        const uint8_t *visible = mask ? mask + (mask_rows == 1 ? 0 : s) * N : 0;
        const int64_t n = mora_route_token(
            z + t * N, N, B, O, y + t * y_stride, visible, present,
            mora_budget(top_k, s, default_k, N), threshold ? threshold[s] : default_threshold,
            inv_tau, slot_scale, slots);
        active[t] = (int32_t)n;
        if (hits && (!valid || valid[t]))
            for (int64_t j = 0; j < n; ++j) hits[s * N + slots[j]] += 1;
    }
    return 0;
}
