// y[M, N] = x[M, K] @ w[K, N] on x86-64 CPUs with AVX-512, for the sampler's decode loop.
//
// `WarpJaxPack` lays the weights out once as panels `[ceil(N / 32), K, 32]` (zero-padded past
// N), from `w [K, N]` or from its transpose `[N, K]` (the embedding, for the vocabulary
// projection). `WarpJaxPackedMatmul` multiplies x by one or several packed matrices: each panel
// is a contiguous stream that the micro-kernel reads once per 8 rows of x, holding the 8 x 32
// outputs in 16 vector registers. Both split their panels into one chunk per thread of XLA's
// intra-op pool; the calling thread takes chunks too, so a call finishes even when no pool
// thread is free. `WarpJaxPackedGeglu` is the MLP's gelu(x @ gate) * (x @ up) on packed gate
// and up; `WarpJaxDecodeAttention` a decode step's attention with its KV-cache update in place;
// `WarpJaxDraw` the sampler's token draw.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // output columns per panel: two 16-float vectors
constexpr int64_t kRows = 8;    // rows of x per micro-kernel call
// Below this much work (multiply-adds, or floats packed), threads cost more than they save.
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

// `rows` (1..8) rows of y at columns [0, 32) of one panel; `mask0`/`mask1` select the
// columns that exist (the last panel may be partly padding).
template <int kR>
void MicroKernel(const float* x, int64_t k, const float* panel, float* y, int64_t n,
                 __mmask16 mask0, __mmask16 mask1) {
  __m512 acc0[kR], acc1[kR];
  for (int r = 0; r < kR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    const float* w = panel + i * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * kPanel + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w);
    const __m512 w1 = _mm512_loadu_ps(w + 16);
    for (int r = 0; r < kR; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + i]);
      acc0[r] = _mm512_fmadd_ps(xr, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(xr, w1, acc1[r]);
    }
  }
  for (int r = 0; r < kR; ++r) {
    _mm512_mask_storeu_ps(y + r * n, mask0, acc0[r]);
    _mm512_mask_storeu_ps(y + r * n + 16, mask1, acc1[r]);
  }
}

using MicroKernelFn = void (*)(const float*, int64_t, const float*, float*, int64_t,
                               __mmask16, __mmask16);
constexpr MicroKernelFn kMicroKernels[kRows + 1] = {
    nullptr,         MicroKernel<1>, MicroKernel<2>, MicroKernel<3>, MicroKernel<4>,
    MicroKernel<5>,  MicroKernel<6>, MicroKernel<7>, MicroKernel<8>};

__mmask16 ColumnMask(int64_t columns) {
  columns = std::clamp<int64_t>(columns, 0, 16);
  return static_cast<__mmask16>((uint32_t{1} << columns) - 1);
}

struct Matmul {
  const float* x;
  const float* panels;
  float* y;
  int64_t m, k, n;

  // Panels [first, last) for every row of x.
  void Run(int64_t first, int64_t last) const {
    for (int64_t p = first; p < last; ++p) {
      const int64_t left = n - p * kPanel;
      const __mmask16 mask0 = ColumnMask(left), mask1 = ColumnMask(left - 16);
      const float* panel = panels + p * k * kPanel;
      for (int64_t r = 0; r < m; r += kRows) {
        const int64_t rows = std::min(kRows, m - r);
        kMicroKernels[rows](x + r * k, k, panel, y + r * n + p * kPanel, n, mask0, mask1);
      }
    }
  }
};

// Chunks of panels handed out to whichever thread asks next; shared with the pool's tasks,
// which may start after the call has returned (they then find no chunk left).
struct Work {
  std::function<void(int64_t, int64_t)> run;  // panels [first, last)
  int64_t num_panels, chunks, chunk_size;
  std::atomic<int64_t> next{0}, finished{0};

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run(c * chunk_size, std::min(num_panels, (c + 1) * chunk_size));
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// `run` over all panels, on the pool's threads when there is enough `work_size` (multiply-adds
// or floats moved) to pay for them.
void ForPanels(ffi::ThreadPool& pool, int64_t num_panels, int64_t work_size,
               std::function<void(int64_t, int64_t)> run) {
  const int64_t threads = std::min(num_panels, std::max<int64_t>(1, pool.num_threads()));
  if (threads == 1 || work_size < kMinParallelWork) {
    run(0, num_panels);
    return;
  }
  auto work = std::make_shared<Work>();
  work->run = std::move(run);
  work->num_panels = num_panels;
  work->chunk_size = (num_panels + threads - 1) / threads;
  work->chunks = (num_panels + work->chunk_size - 1) / work->chunk_size;
  for (int64_t t = 1; t < work->chunks; ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->finished.load(std::memory_order_acquire) < work->chunks) {
    _mm_pause();
  }
}

// y_i = x @ w_i for every packed w_i: one call, the panels of all of them split between the
// threads (a layer's q, k and v, or its MLP's gate and up, read x once).
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::RemainingArgs weights, ffi::RemainingRets outputs) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || weights.size() == 0 || weights.size() != outputs.size()) {
    return ffi::Error::InvalidArgument(
        "packed_matmul expects x [M, K] and as many packed matrices as outputs");
  }
  std::vector<Matmul> matmuls;
  std::vector<int64_t> starts = {0};  // each matrix's first panel among all of them
  int64_t work_size = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto panels = weights.get<ffi::Buffer<ffi::F32>>(i);
    auto y = outputs.get<ffi::Buffer<ffi::F32>>(i);
    if (!panels.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("packed_matmul takes and returns float32 buffers");
    }
    const auto pd = panels->dimensions(), yd = (*y)->dimensions();
    if (pd.size() != 3 || yd.size() != 2 || pd[2] != kPanel || pd[1] != xd[1] ||
        yd[0] != xd[0] || pd[0] != (yd[1] + kPanel - 1) / kPanel) {
      return ffi::Error::InvalidArgument(
          "packed_matmul expects x [M, K], panels [ceil(N / 32), K, 32] and y [M, N]");
    }
    matmuls.push_back(
        Matmul{x.typed_data(), panels->typed_data(), (*y)->typed_data(), xd[0], xd[1], yd[1]});
    starts.push_back(starts.back() + pd[0]);
    work_size += xd[0] * xd[1] * yd[1];
  }
  ForPanels(pool, starts.back(), work_size, [matmuls, starts](int64_t first, int64_t last) {
    for (size_t i = 0; i < matmuls.size(); ++i) {
      const int64_t lo = std::max(first, starts[i]), hi = std::min(last, starts[i + 1]);
      if (lo < hi) matmuls[i].Run(lo - starts[i], hi - starts[i]);
    }
  });
  return ffi::Error::Success();
}

// exp of 16 floats: Cephes' expf polynomial after the reduction x = n ln 2 + r, |r| <= ln 2 / 2,
// scaled by 2^n with scalef (exp of -inf and of very negative x is 0).
__m512 Exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// GELU, tanh approximation, of 16 floats: 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y)) with
// y = sqrt(2 / pi) (g + 0.044715 g^3); 0 where y < -44 (NaN stays NaN), past which exp(-2y)
// saturates (the true value is below float32's smallest normal there).
__m512 GeluTanh16(__m512 g) {
  const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
  const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
  const __m512 e = Exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), y));
  const __mmask16 live = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-44.0f), _CMP_NLT_UQ);
  return _mm512_maskz_div_ps(live, g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// hidden[M, F] = gelu_tanh(x @ gate) * (x @ up), Gemma's GeGLU, on packed gate and up: both
// tiles of a panel are computed, then combined, so neither product is written out.
ffi::Error PackedGeglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gate,
                       ffi::Buffer<ffi::F32> up, ffi::ResultBuffer<ffi::F32> hidden) {
  const auto xd = x.dimensions(), gd = gate.dimensions(), ud = up.dimensions(),
             hd = hidden->dimensions();
  if (xd.size() != 2 || gd.size() != 3 || hd.size() != 2 || gd[2] != kPanel ||
      gd[1] != xd[1] || hd[0] != xd[0] || gd[0] != (hd[1] + kPanel - 1) / kPanel ||
      ud.size() != 3 || ud[0] != gd[0] || ud[1] != gd[1] || ud[2] != gd[2]) {
    return ffi::Error::InvalidArgument(
        "packed_geglu expects x [M, K], gate and up panels [ceil(F / 32), K, 32], hidden [M, F]");
  }
  const int64_t m = xd[0], k = xd[1], f = hd[1];
  const float *xs = x.typed_data(), *gs = gate.typed_data(), *us = up.typed_data();
  float* h = hidden->typed_data();
  ForPanels(pool, gd[0], 2 * m * k * f, [=](int64_t first, int64_t last) {
    alignas(64) float g_tile[kRows * kPanel], u_tile[kRows * kPanel];
    for (int64_t p = first; p < last; ++p) {
      const int64_t left = f - p * kPanel;
      const __mmask16 masks[2] = {ColumnMask(left), ColumnMask(left - 16)};
      for (int64_t r = 0; r < m; r += kRows) {
        const int64_t rows = std::min(kRows, m - r);
        kMicroKernels[rows](xs + r * k, k, gs + p * k * kPanel, g_tile, kPanel, 0xFFFF, 0xFFFF);
        kMicroKernels[rows](xs + r * k, k, us + p * k * kPanel, u_tile, kPanel, 0xFFFF, 0xFFFF);
        for (int64_t i = 0; i < rows; ++i) {
          for (int half = 0; half < 2; ++half) {
            const int64_t c = i * kPanel + 16 * half;
            const __m512 out = _mm512_mul_ps(GeluTanh16(_mm512_load_ps(g_tile + c)),
                                             _mm512_load_ps(u_tile + c));
            _mm512_mask_storeu_ps(h + (r + i) * f + p * kPanel + 16 * half, masks[half], out);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// One panel row (32 floats) from `src`; with `stream` (dst 64-byte aligned), non-temporal
// stores: the decode loop reads the panels long after, and stores that bypass the caches skip
// reading each destination line first.
inline void PutRow(float* dst, const float* src, bool stream) {
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
  if (stream) {
    _mm512_stream_ps(dst, a);
    _mm512_stream_ps(dst + 16, b);
  } else {
    _mm512_storeu_ps(dst, a);
    _mm512_storeu_ps(dst + 16, b);
  }
}

// Panels [first, last) of `w` ([K, N], or [N, K] when `transposed`), reading `w` in rows; the
// last panel's columns past N are zero.
void PackPanels(const float* w, float* panels, int64_t k, int64_t n, bool transposed,
                int64_t first, int64_t last) {
  const bool stream = reinterpret_cast<uintptr_t>(panels) % 64 == 0;
  if (transposed) {  // row j of w is column j % 32 of panel j / 32: 64 rows of a panel at a time
    constexpr int64_t kBlock = 64;
    alignas(64) float tile[kBlock * kPanel];
    for (int64_t p = first; p < last; ++p) {
      const int64_t columns = std::min(kPanel, n - p * kPanel);
      if (columns < kPanel) std::fill(tile, tile + kBlock * kPanel, 0.0f);
      for (int64_t i0 = 0; i0 < k; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, k - i0);
        for (int64_t c = 0; c < columns; ++c) {
          const float* row = w + (p * kPanel + c) * k + i0;
          for (int64_t i = 0; i < rows; ++i) tile[i * kPanel + c] = row[i];
        }
        for (int64_t i = 0; i < rows; ++i) {
          PutRow(panels + (p * k + i0 + i) * kPanel, tile + i * kPanel, stream);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < k; ++i) {  // row i of w is row i of every panel
      for (int64_t p = first; p < last; ++p) {
        const int64_t columns = std::min(kPanel, n - p * kPanel);
        const float* src = w + i * n + p * kPanel;
        float* dst = panels + (p * k + i) * kPanel;
        if (columns == kPanel) {
          PutRow(dst, src, stream);
        } else {
          std::fill(std::copy_n(src, columns, dst), dst + kPanel, 0.0f);
        }
      }
    }
  }
  if (stream) _mm_sfence();  // the streamed rows are visible before the chunk counts as done
}

ffi::Error Pack(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> panels,
                bool transposed) {
  const auto wd = w.dimensions(), pd = panels->dimensions();
  const bool matrix = wd.size() == 2;
  const int64_t k = matrix ? wd[transposed] : -1, n = matrix ? wd[!transposed] : -1;
  if (k < 0 || pd.size() != 3 || pd[2] != kPanel || pd[1] != k ||
      pd[0] != (n + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument(
        "pack expects w [K, N] ([N, K] transposed) and panels [ceil(N / 32), K, 32]");
  }
  const float* src = w.typed_data();
  float* dst = panels->typed_data();
  ForPanels(pool, pd[0], k * n, [=](int64_t first, int64_t last) {
    PackPanels(src, dst, k, n, transposed, first, last);
  });
  return ffi::Error::Success();
}

// tanh of 16 floats: 1 - 2 / (exp(2x) + 1) (exp saturates to +-1 past |x| = 44).
__m512 Tanh16(__m512 x) {
  const __m512 e = Exp16(_mm512_add_ps(x, x));
  return _mm512_sub_ps(_mm512_set1_ps(1.0f),
                       _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
}

constexpr float kMasked = -2.3819763e38f;  // gemma/model.py's _MASKED

// One decode step of attention for one row and one KV head: writes the new key and value at
// `slot` of the caches (keys [H, S], slots last; values [S, H]), then the G query heads
// grouped with the KV head attend to slots [0, slot] allowed by `mask` (later slots are never
// allowed: causal). `scores` holds S floats.
void AttendOne(const float* q, const float* k_new, const float* v_new, float* keys,
               float* values, const bool* mask, int64_t g_heads, int64_t h, int64_t s,
               int64_t slot, float softcap, float* scores, float* out) {
  for (int64_t i = 0; i < h; ++i) {
    keys[i * s + slot] = k_new[i];
    values[slot * h + i] = v_new[i];
  }
  int64_t end = slot + 1;
  bool any = false;
  for (int64_t j = 0; j < end; ++j) any |= mask[j];
  if (!any) end = s;  // no slot allowed: every score masked, a uniform softmax as in XLA
  for (int64_t g = 0; g < g_heads; ++g) {
    const float* qg = q + g * h;
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < end; j += 16) {
      const __mmask16 in = ColumnMask(end - j);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < h; ++i) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(qg[i]), _mm512_maskz_loadu_ps(in, keys + i * s + j),
                              acc);
      }
      if (softcap > 0.0f) {
        acc = _mm512_mul_ps(Tanh16(_mm512_div_ps(acc, _mm512_set1_ps(softcap))),
                            _mm512_set1_ps(softcap));
      }
      __mmask16 allowed = 0;
      for (int64_t c = 0; c < 16 && j + c < end; ++c) {
        allowed |= static_cast<__mmask16>(mask[j + c]) << c;
      }
      acc = _mm512_mask_blend_ps(allowed, _mm512_set1_ps(kMasked), acc);
      _mm512_mask_storeu_ps(scores + j, in, acc);
      top16 = _mm512_mask_max_ps(top16, in, top16, acc);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t j = 0; j < end; j += 16) {
      const __mmask16 in = ColumnMask(end - j);
      const __m512 e = _mm512_maskz_mov_ps(
          in, Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, scores + j), top)));
      _mm512_mask_storeu_ps(scores + j, in, e);
      sum16 = _mm512_add_ps(sum16, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum16);
    float* og = out + g * h;
    for (int64_t i = 0; i < h; i += 16) {
      const __mmask16 in = ColumnMask(h - i);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < end; ++j) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]),
                              _mm512_maskz_loadu_ps(in, values + j * h + i), acc);
      }
      _mm512_mask_storeu_ps(og + i, in, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
  }
}

// A decode step's attention (one new token per row), the KV caches updated in place (they are
// aliased to the last two results): q [B, N, H] (scaled and rotated), the new keys and values
// [B, K, H], caches keys [B, K, H, S] and values [B, K, S, H], mask [B, S] (the slots each row
// may attend to), the new token's slot (a scalar); out [B, N, H]. Gemma 2's soft-cap of the
// scores when `softcap` > 0.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                           ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                           ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> slot_buffer,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> keys,
                           ffi::ResultBuffer<ffi::F32> values, float softcap) {
  const auto qd = q.dimensions(), kd = keys->dimensions(), vd = values->dimensions();
  // Caches of one KV head may come without their K axis (an axis of 1 in XLA's loop state
  // makes it copy the caches): [B, H, S] and [B, S, H].
  const bool ranks = qd.size() == 3 && kd.size() == vd.size() && (kd.size() == 3 || kd.size() == 4);
  const int64_t b = ranks ? qd[0] : 0, n = ranks ? qd[1] : 0, h = ranks ? qd[2] : 0;
  const int64_t k = !ranks ? 0 : kd.size() == 4 ? kd[1] : 1, s = ranks ? kd.back() : 0;
  const int64_t r = ranks ? kd.size() - 4 : 0;  // -1 without the K axis
  if (!ranks || k == 0 || n % k != 0 || kd[0] != b || kd[2 + r] != h || vd[0] != b ||
      (r == 0 && vd[1] != k) || vd[2 + r] != s || vd[3 + r] != h ||
      k_new.element_count() != static_cast<size_t>(b * k * h) ||
      v_new.element_count() != static_cast<size_t>(b * k * h) ||
      mask.element_count() != static_cast<size_t>(b * s) || slot_buffer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "decode_attention expects q [B, N, H], new keys and values [B, K, H], caches [B, K, H, "
        "S] and [B, K, S, H] (or [B, H, S] and [B, S, H]), mask [B, S] and a scalar slot");
  }
  const int64_t slot = *slot_buffer.typed_data();
  if (slot < 0 || slot >= s) {
    return ffi::Error::InvalidArgument("decode_attention: the slot is outside the cache");
  }
  const float *qs = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  const bool* m = mask.typed_data();
  float *o = out->typed_data(), *kc = keys->typed_data(), *vc = values->typed_data();
  const int64_t g = n / k;
  // The work: the caches' floats read plus the multiply-adds (the 100M model's attention at
  // batch 8 reads 3 MB of cache per layer for 0.8M multiply-adds, and is faster on two threads).
  ForPanels(pool, b * k, b * k * s * h * 2 + b * n * s * h * 2, [=](int64_t first, int64_t last) {
    std::vector<float> scores(s);
    for (int64_t item = first; item < last; ++item) {  // item = row * K + KV head
      AttendOne(qs + item * g * h, kn + item * h, vn + item * h, kc + item * h * s,
                vc + item * s * h, m + (item / k) * s, g, h, s, slot, softcap, scores.data(),
                o + item * g * h);
    }
  });
  return ffi::Error::Success();
}

constexpr int64_t kDrawBlock = 128;  // tokens per block of the two-level inverse CDF

// The first index of `mass[0, n)` at which `before` plus the running sum exceeds `target`,
// clipped to the last index with mass (rounding may leave the target unreached); -1 if none
// has mass.
int64_t FirstAbove(const float* mass, int64_t n, float before, float target) {
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (mass[i] > 0.0f) {
      last = i;
      before += mass[i];
      if (before > target) break;
    }
  }
  return last;
}

// One row of `Draw`: inverse-CDF sampling in two levels, blocks of 128 tokens then the token
// within the block (as `sampling._draw`), so -inf logits are never drawn. `mass` holds V
// floats (rounded up to a block), `blocks` one per block.
void DrawRow(const float* logits, int64_t v, float scale, float u, float* mass, float* blocks,
             int32_t* token, float* logp) {
  __m512 top16 = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < v; i += 16) {
    const __mmask16 in = ColumnMask(v - i);
    top16 = _mm512_mask_max_ps(top16, in, top16, _mm512_maskz_loadu_ps(in, logits + i));
  }
  const float top = _mm512_reduce_max_ps(top16) * scale;
  const int64_t num_blocks = (v + kDrawBlock - 1) / kDrawBlock;
  float total = 0.0f;
  for (int64_t j = 0; j < num_blocks; ++j) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = j * kDrawBlock; i < (j + 1) * kDrawBlock; i += 16) {
      const __mmask16 in = ColumnMask(v - i);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, logits + i),
                                       _mm512_set1_ps(scale), _mm512_set1_ps(top));
      const __m512 e = _mm512_maskz_mov_ps(in, Exp16(x));
      _mm512_storeu_ps(mass + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    blocks[j] = _mm512_reduce_add_ps(sum);
    total += blocks[j];
  }
  const float target = u * total;
  const int64_t block = std::max<int64_t>(FirstAbove(blocks, num_blocks, 0.0f, target), 0);
  float before = 0.0f;
  for (int64_t j = 0; j < block; ++j) before += blocks[j];
  const int64_t chosen = block * kDrawBlock +
      std::max<int64_t>(FirstAbove(mass + block * kDrawBlock, kDrawBlock, before, target), 0);
  *token = static_cast<int32_t>(chosen);
  *logp = logits[chosen] * scale - top - std::log(total);
}

// tokens[b], logps[b] = a draw from softmax(logits[b] * scale) given uniforms[b] in [0, 1).
ffi::Error Draw(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> uniforms,
                ffi::Buffer<ffi::F32> scale_buffer, ffi::ResultBuffer<ffi::S32> tokens,
                ffi::ResultBuffer<ffi::F32> logps) {
  const auto ld = logits.dimensions();
  if (ld.size() != 2 || scale_buffer.element_count() != 1 ||
      uniforms.element_count() != static_cast<size_t>(ld[0]) ||
      tokens->element_count() != static_cast<size_t>(ld[0]) ||
      logps->element_count() != static_cast<size_t>(ld[0])) {
    return ffi::Error::InvalidArgument(
        "draw expects logits [B, V], uniforms [B], a scalar scale and [B] outputs");
  }
  const int64_t rows = ld[0], v = ld[1];
  const float scale = *scale_buffer.typed_data();
  const float* l = logits.typed_data();
  const float* u = uniforms.typed_data();
  int32_t* t = tokens->typed_data();
  float* lp = logps->typed_data();
  ForPanels(pool, rows, rows * v * 16, [=](int64_t first, int64_t last) {
    const int64_t num_blocks = (v + kDrawBlock - 1) / kDrawBlock;
    std::vector<float> mass(num_blocks * kDrawBlock), blocks(num_blocks);
    for (int64_t b = first; b < last; ++b) {
      DrawRow(l + b * v, v, scale, u[b], mass.data(), blocks.data(), t + b, lp + b);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarpJaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarpJaxPackedGeglu, PackedGeglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarpJaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarpJaxPack, Pack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarpJaxDraw, Draw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
