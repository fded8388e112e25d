// One adapted layer's whole MoRA update in one call, for CPU float32 inference (the
// cpu_fused layer backend, mora_runtime/experts/backends/cpu_fused.py):
//   z = x A^T (expert_scores.cpp's tiles up to `kernel_max_tokens` tokens, else at::mm),
//   then every token's routing and value update (mora_route.h), then the activation
//   counts. Up to `kernel_max_tokens` tokens both phases run in one OpenMP region (torch's
//   thread count); beyond, at::mm and then the tokens over torch's thread pool. Built
//   without AVX2 (cpu/build.py's portable build), the scores are always at::mm.
// What it saves over the tensor path is its dozen small tensor ops per layer, whose fixed
// cost, paid by every adapted layer of every decode step, dwarfs their arithmetic;
// prefill-sized batches also route on every thread. The routing may round differently from
// the tensor path's (this file is built with -mfma and C++ contracts multiply-adds), so a
// score exactly at the threshold could go either way. x and y come in the model's shape
// ([B, L, D] / [B, L, O]) and the counts go into a row of the recorder's [L, T] buffer, so
// the caller makes no tensor op (each would release the GIL).
//
// A plan holds what stays the same for every layer of one forward (the backend builds one
// per forward): routing defaults, per-sequence overrides, token -> sequence, masks.
// Its Python binding is in expert_layer.cpp; decoder_layer.cpp calls it directly.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

extern "C" {
#include "mora_route.h"
}

#ifdef __AVX2__
int64_t expert_score_group_count(int64_t N);
void expert_score_groups(const float* x, const float* a, float* z, int64_t g_begin,
                         int64_t g_end, int64_t T, int64_t D, int64_t N);
#endif

namespace mora {

template <typename T>
inline const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

inline void check_cpu(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim &&
                  t.is_contiguous(),
              "ExpertLayerPlan: ", what, " must be a contiguous CPU tensor of ", dtype,
              " with ", dim, " dimension(s)");
}

class ExpertLayerPlan {
 public:
  // mask [S|1, N] bool; seq [T] long (None: one sequence); seq_top_k [S] long and
  // seq_threshold [S] float (None: the defaults); valid [T] bool (None: every token counts);
  // slot_scale [N'] float with N' >= any layer's N.
  ExpertLayerPlan(int64_t num_tokens, int64_t top_k, double threshold, double tau,
                  at::Tensor slot_scale, int64_t kernel_max_tokens,
                  std::optional<at::Tensor> mask, std::optional<at::Tensor> seq,
                  std::optional<at::Tensor> seq_top_k, std::optional<at::Tensor> seq_threshold,
                  std::optional<at::Tensor> valid)
      : T_(num_tokens),
        default_k_(top_k),
        default_threshold_(static_cast<float>(threshold)),
        inv_tau_(1.0f / static_cast<float>(tau)),
        kernel_max_tokens_(kernel_max_tokens),
        slot_scale_(std::move(slot_scale)),
        mask_(std::move(mask)),
        seq_(std::move(seq)),
        seq_top_k_(std::move(seq_top_k)),
        seq_threshold_(std::move(seq_threshold)),
        valid_(std::move(valid)),
        scratch_(static_cast<size_t>(std::max<int64_t>(num_tokens, 0))) {
    check_cpu(slot_scale_, at::kFloat, 1, "slot_scale");
    if (mask_) check_cpu(*mask_, at::kBool, 2, "mask");
    if (seq_) {
      check_cpu(*seq_, at::kLong, 1, "seq");
      TORCH_CHECK(seq_->size(0) == T_, "ExpertLayerPlan: seq must have one entry per token");
    }
    if (seq_top_k_) check_cpu(*seq_top_k_, at::kLong, 1, "seq_top_k");
    if (seq_threshold_) check_cpu(*seq_threshold_, at::kFloat, 1, "seq_threshold");
    if (valid_) {
      check_cpu(*valid_, at::kBool, 1, "valid");
      TORCH_CHECK(valid_->size(0) == T_, "ExpertLayerPlan: valid must have one entry per token");
    }
    // Every sequence id must index the per-sequence tensors (the kernel does not check).
    max_s_ = 0;
    const int64_t* seq_p = data_or_null<int64_t>(seq_);
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t s = seq_p ? seq_p[t] : 0;
      TORCH_CHECK(s >= 0, "ExpertLayerPlan: negative sequence id");
      max_s_ = std::max(max_s_, s);
    }
    const auto covers = [&](const std::optional<at::Tensor>& t) {
      return !t.has_value() || t->size(0) > max_s_;
    };
    TORCH_CHECK(covers(seq_top_k_) && covers(seq_threshold_) &&
                    (!mask_.has_value() || mask_->size(0) == 1 || mask_->size(0) > max_s_),
                "ExpertLayerPlan: a sequence id is beyond the per-sequence tensors");
    // The largest budget any token asks for (before clamping to a layer's N).
    max_k_ = 0;
    const int64_t* k_p = data_or_null<int64_t>(seq_top_k_);
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t s = seq_p ? seq_p[t] : 0;
      max_k_ = std::max(max_k_, k_p ? k_p[s] : default_k_);
    }
  }

  // Whether `apply` runs without the GIL: only past the decode-sized kernel path.
  bool releases_gil() const { return T_ > kernel_max_tokens_; }

  // Whether a layer of N slots can take the plan (every token's k_eff <= MORA_MAX_K).
  bool accepts(int64_t N) const {
    return std::min(std::max<int64_t>(max_k_, MORA_MIN_TOP_K), N) <= MORA_MAX_K;
  }

  // y += the layer's MoRA delta, in place. x [..., D] and y [..., O] float, T rows each
  // (y contiguous; any leading shape, so the caller reshapes nothing); A [N, D], B [N, O]
  // float; present [N] bool (None: every slot); active [L, T] int32 (None: not recorded):
  // row `active_row` gets the experts each token used; hits [S, N] long (None: not
  // recorded) += 1 per (token, expert) where the token is valid. Returns false, writing
  // nothing, when `accepts(N)` is false.
  bool apply(const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& B, at::Tensor y,
             const std::optional<at::Tensor>& present, const std::optional<at::Tensor>& active,
             int64_t active_row, const std::optional<at::Tensor>& hits) {
    TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
                "ExpertLayerPlan: x must be a float32 CPU tensor");
    check_cpu(A, at::kFloat, 2, "A");
    check_cpu(B, at::kFloat, 2, "B");
    TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() >= 1 &&
                    y.is_contiguous(),
                "ExpertLayerPlan: y must be a contiguous float32 CPU tensor");
    const int64_t N = A.size(0), D = A.size(1), O = B.size(1);
    TORCH_CHECK(x_in.size(-1) == D && x_in.numel() == T_ * D && B.size(0) == N &&
                    y.size(-1) == O && y.numel() == T_ * O && slot_scale_.size(0) >= N,
                "ExpertLayerPlan: shapes do not match the plan (x [..., D] and y [..., O] with "
                "T rows, A [N, D], B [N, O])");
    const at::Tensor x = (x_in.is_contiguous() ? x_in : x_in.contiguous()).view({T_, D});
    if (present) {
      check_cpu(*present, at::kBool, 1, "present");
      TORCH_CHECK(present->size(0) == N, "ExpertLayerPlan: present must have N entries");
    }
    if (active) {
      check_cpu(*active, at::kInt, 2, "active");
      TORCH_CHECK(active->size(1) == T_ && active_row >= 0 && active_row < active->size(0),
                  "ExpertLayerPlan: active must be [L, T] with the row inside it");
    }
    if (hits) {
      check_cpu(*hits, at::kLong, 2, "hits");
      TORCH_CHECK(hits->size(1) == N && hits->size(0) > max_s_,
                  "ExpertLayerPlan: hits must be [S, N]");
    }
    if (mask_) TORCH_CHECK(mask_->size(1) == N, "ExpertLayerPlan: the mask has another N");
    if (!accepts(N)) return false;
    if (T_ == 0 || N == 0) return true;

    const int64_t K = std::min(std::max<int64_t>(max_k_, MORA_MIN_TOP_K), N);
    std::vector<int64_t> slots(static_cast<size_t>(T_ * K));
    int32_t* counts = active ? active->data_ptr<int32_t>() + active_row * T_ : scratch_.data();
    const float* Bp = B.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const uint8_t* mask_p = data_or_null<uint8_t>(mask_);
    const int64_t mask_rows = mask_ ? mask_->size(0) : 0;
    const int64_t* seq_p = data_or_null<int64_t>(seq_);
    const int64_t* k_p = data_or_null<int64_t>(seq_top_k_);
    const float* thr_p = data_or_null<float>(seq_threshold_);
    const uint8_t* present_p = data_or_null<uint8_t>(present);
    const float* scale_p = slot_scale_.data_ptr<float>();
    // Tokens are independent: each writes its own row of y and of `slots`.
    const auto route = [&](const float* zp, int64_t t) {
      const int64_t s = seq_p ? seq_p[t] : 0;
      const uint8_t* visible = mask_p ? mask_p + (mask_rows == 1 ? 0 : s) * N : nullptr;
      counts[t] = static_cast<int32_t>(mora_route_token(
          zp + t * N, N, Bp, O, yp + t * O, visible, present_p,
          mora_budget(k_p, s, default_k_, N), thr_p ? thr_p[s] : default_threshold_, inv_tau_,
          scale_p, slots.data() + t * K));
    };

#ifdef __AVX2__
    if (T_ <= kernel_max_tokens_) {
      at::Tensor z = at::empty({T_, N}, x.options());
      const float* xp = x.data_ptr<float>();
      const float* ap = A.data_ptr<float>();
      float* zp = z.data_ptr<float>();
      const int64_t groups = expert_score_group_count(N);
      const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), groups));
      // One parallel region for both phases of a decode step: the keys split over the
      // threads, a barrier (every token needs every key's score), then the tokens: the
      // routing is split without the cost of a second fork/join.
#pragma omp parallel num_threads(threads) if (threads > 1)
      {
        const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
        expert_score_groups(xp, ap, zp, groups * tid / nt, groups * (tid + 1) / nt, T_, D, N);
#pragma omp barrier
        for (int64_t t = tid; t < T_; t += nt) route(zp, t);
      }
    } else
#endif
    {
      const at::Tensor z = at::mm(x, A.t()).contiguous();
      const float* zp = z.data_ptr<float>();
      at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) route(zp, t);
      });
    }
    if (hits) {  // serial: tokens of one sequence add into the same row
      int64_t* hits_p = hits->data_ptr<int64_t>();
      const uint8_t* valid_p = data_or_null<uint8_t>(valid_);
      for (int64_t t = 0; t < T_; ++t) {
        if (valid_p && !valid_p[t]) continue;
        const int64_t s = seq_p ? seq_p[t] : 0;
        for (int64_t j = 0; j < counts[t]; ++j) hits_p[s * N + slots[t * K + j]] += 1;
      }
    }
    return true;
  }

 private:
  int64_t T_;
  int64_t default_k_;
  float default_threshold_;
  float inv_tau_;
  int64_t kernel_max_tokens_;
  int64_t max_k_;
  int64_t max_s_;  // the largest sequence id of any token
  at::Tensor slot_scale_;
  std::optional<at::Tensor> mask_, seq_, seq_top_k_, seq_threshold_, valid_;
  std::vector<int32_t> scratch_;  // per-token counts nobody records
};

}  // namespace mora
