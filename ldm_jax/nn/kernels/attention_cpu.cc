// Fused attention for CPUs and small heads (2 to 16 channels), forward and backward:
// softmax(q kᵀ·scale) v for float32 q, k, v of [B, L, H, D] in one sweep over the keys that holds
// at most 64 logits per query (in L1), never the [Lq, Lk] matrix.
//
// Called from JAX through the XLA FFI (ldm_jax/nn/fused_attention.py builds this file with the
// system C++ compiler for the machine it runs on). With head_dim 8 the products q·k and p·v are
// too thin for matmuls: XLA's blocked attention spends its time in them and in the exponentials'
// memory traffic. Here 16 queries (8 with AVX2) sit in the lanes of one vector register
// (QueryLanes; kLanes below); logits are in log2 units (q is pre-scaled by scale·log2(e)), so the
// exponential is a 2^x polynomial. Work items (example·head pair, 64 queries) are shared by a few
// threads.
//
// Outputs: the attention output [B, Lq, H, D] and each query's log-sum-exp of the scaled logits
// (natural log) [B, H, Lq], from which the backward pass (below, also fused) recomputes the
// probabilities.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

// The vector width: 16 floats with AVX-512, 8 with AVX2 (whose 16 registers hold the forward's q
// and running sums for heads of 8 only at that width: 16 lanes ran 4× slower on a Zen 3).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef vf vf_unaligned __attribute__((aligned(alignof(float))));  // for vectors in std::vector buffers

inline vf splat(float x) { return vf{} + x; }

// 2^f for f in [−0.5, 0.5] by a degree-5 minimax polynomial (relative error 7.5e-8, below float32's
// half ulp; about 2e-7 after the float32 arithmetic). Cephes' degree 6 (error 8e-8 after the
// arithmetic) took one multiply-add more of the forward's 22 per key: 70 against 66 ms (AVX2).
inline vf exp2_poly(vf f) {
  vf p = splat(1.327647245e-3f);
  p = p * f + splat(9.675540961e-3f);
  p = p * f + splat(5.550713092e-2f);
  p = p * f + splat(2.402212024e-1f);
  p = p * f + splat(6.931469440e-1f);
  return p * f + splat(1.000000119f);
}

#ifdef __AVX512F__
// AVX-512: round and scale by 2^n in one instruction each (vrndscaleps, vscalefps; scalef flushes
// 2^n below the float range to 0 by itself).
inline vf exp2_nonpositive(vf x) {
  const __m512 xm = reinterpret_cast<__m512>(x);
  const __m512 n = _mm512_roundscale_ps(xm, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf p = exp2_poly(reinterpret_cast<vf>(_mm512_sub_ps(xm, n)));
  return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), n));
}
#else
// x + 1.5·2^23 rounds x to the nearest integer n, which the sum's low mantissa bits hold: shifted
// into the exponent field and added to p's bits, it multiplies p by 2^n without a conversion to
// int and back. x is clamped to −125 first (2^n stays normal); 2^x below that is 2^−125 instead of
// 0, nothing beside the sums it joins (at least 2^−40 in the forward, 1 in the backward).
inline vf exp2_nonpositive(vf x) {
  x = x > splat(-125.f) ? x : splat(-125.f);
  const vf magic = splat(0x1.8p23f);
  const vf shifted = x + magic;
  const vf p = exp2_poly(x - (shifted - magic));
  vi n_bits, p_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  std::memcpy(&p_bits, &p, sizeof(p_bits));
  p_bits += n_bits << 23;
  vf result;
  std::memcpy(&result, &p_bits, sizeof(result));
  return result;
}
#endif

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  float* lse;
  int64_t batch, q_len, k_len, heads, dim;
  float scale;
};

constexpr int kQueryTile = 64;  // queries per work item
constexpr int kForwardKeys = 64;  // keys whose probabilities are held at a time

// One (example, head) pair's keys and values, row-major [k_len][D], and the largest key norm.
struct PairBuffers {
  std::vector<float> k, v;
  float max_key_norm = 0.f;
  int64_t packed_pair = -1;
};

template <int D>
void PackPair(const Problem& pb, int64_t pair, PairBuffers& buf) {
  const int64_t b = pair / pb.heads, h = pair % pb.heads;
  const int64_t row = pb.heads * D;
  const float* k = pb.k + b * pb.k_len * row + h * D;
  const float* v = pb.v + b * pb.k_len * row + h * D;
  buf.k.resize(pb.k_len * D);
  buf.v.resize(pb.k_len * D);
  float max_sq = 0.f;
  for (int64_t j = 0; j < pb.k_len; ++j) {
    float sq = 0.f;
    for (int d = 0; d < D; ++d) {
      buf.k[j * D + d] = k[j * row + d];
      buf.v[j * D + d] = v[j * row + d];
      sq += k[j * row + d] * k[j * row + d];
    }
    max_sq = std::max(max_sq, sq);
  }
  buf.max_key_norm = std::sqrt(max_sq) * (1.f + 1e-5f);  // rounded up: a true bound
  buf.packed_pair = pair;
}

// Query i of a pair the plain way, shifted by its true maximum logit (double sums; rare, see below).
template <int D>
void ExactQuery(const Problem& pb, int64_t pair, int64_t i, const PairBuffers& buf) {
  const int64_t b = pair / pb.heads, h = pair % pb.heads;
  const int64_t row = pb.heads * D;
  const float* q = pb.q + (b * pb.q_len + i) * row + h * D;
  std::vector<double> s(pb.k_len);
  double m = -INFINITY;
  for (int64_t j = 0; j < pb.k_len; ++j) {
    double dot = 0.0;
    for (int d = 0; d < D; ++d) dot += static_cast<double>(q[d]) * buf.k[j * D + d];
    s[j] = dot * pb.scale;
    m = std::max(m, s[j]);
  }
  double sum = 0.0, acc[D] = {};
  for (int64_t j = 0; j < pb.k_len; ++j) {
    const double p = std::exp(s[j] - m);
    sum += p;
    for (int d = 0; d < D; ++d) acc[d] += p * buf.v[j * D + d];
  }
  float* o = pb.out + (b * pb.q_len + i) * row + h * D;
  for (int d = 0; d < D; ++d) o[d] = static_cast<float>(acc[d] / sum);
  pb.lse[(b * pb.heads + h) * pb.q_len + i] = static_cast<float>(m + std::log(sum));
}

// init + Σ_d vecs[d] · row[d] in two chains of products (half the latency of one): each lane's dot
// product with the broadcast row.
template <int D>
inline vf DotRow(const vf* vecs, const float* row, vf init) {
  vf even = init, odd{};
  for (int d = 0; d < D; d += 2) {
    even += vecs[d] * row[d];
    if (d + 1 < D) odd += vecs[d + 1] * row[d + 1];
  }
  return even + odd;
}

// sums[d] += Σ_i weights[i] · rows[i·D + d] for n rows: each lane's weighted sum of a column, eight
// channels per pass over the rows so that their sums, the weight and a broadcast fit in registers.
template <int D>
inline void AccumulateRows(const vf* weights, const float* rows, int64_t n, vf* sums) {
  constexpr int kGroup = D < 8 ? D : 8;
  for (int d0 = 0; d0 < D; d0 += kGroup) {
    vf acc[kGroup];
    for (int g = 0; g < kGroup; ++g) acc[g] = sums[d0 + g];
    for (int64_t i = 0; i < n; ++i)
      for (int g = 0; g < kGroup; ++g) acc[g] += weights[i] * rows[i * D + d0 + g];
    for (int g = 0; g < kGroup; ++g) sums[d0 + g] = acc[g];
  }
}

// Queries [i0, i1) of one pair, 16 at a time in the lanes (8 with AVX2): their running sums and
// weighted values stay in registers for the whole sweep over the keys, each key's channels are
// broadcast, and nothing is summed across lanes. The keys go 64 at a time through three passes:
// logits, their exponentials, then the weighted values (AccumulateRows). (In one pass per key, the
// products with v waited on the exponential's chain of dependent operations, and with them the
// out-of-order core: 127–132 ms against 88–89 ms for [16, 1024, 8, 8] on one AVX2 thread; the
// backward's P and dS likewise, 218–233 against 194–215 ms.) The logits are shifted not by each
// query's maximum (which would take a second sweep) but by an upper bound of it, |q|·max_j |k_j|
// (Cauchy–Schwarz): exponentials of logits up to 2^40 below the shift keep full float precision,
// and a query whose sum of exponentials comes out below 2^-40 (its bound was that loose) is redone
// by ExactQuery.
template <int D>
void QueryLanes(const Problem& pb, int64_t pair, int64_t i0, int64_t i1, const PairBuffers& buf) {
  const int64_t b = pair / pb.heads, h = pair % pb.heads;
  const int64_t row = pb.heads * D;
  const float to_log2 = pb.scale * 1.4426950408889634f;
  const float* k = buf.k.data();
  const float* v = buf.v.data();
  for (int64_t i = i0; i < i1; i += kLanes) {
    const int rows = static_cast<int>(std::min<int64_t>(kLanes, i1 - i));
    vf qt[D];
    for (int d = 0; d < D; ++d) qt[d] = vf{};
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < D; ++d) qt[d][r] = pb.q[(b * pb.q_len + i + r) * row + h * D + d] * to_log2;
    vf sq{};
    for (int d = 0; d < D; ++d) sq += qt[d] * qt[d];
    vf m;
    for (int r = 0; r < kLanes; ++r) m[r] = std::sqrt(sq[r]) * (1.f + 1e-5f) * buf.max_key_norm;

    vf l{}, acc[D];
    for (int d = 0; d < D; ++d) acc[d] = vf{};
    for (int64_t j0 = 0; j0 < pb.k_len; j0 += kForwardKeys) {
      const int64_t n = std::min<int64_t>(kForwardKeys, pb.k_len - j0);
      vf p[kForwardKeys];
      // the logits (log2 units) minus the shift, then their exponentials, then the products with v
      for (int64_t j = j0; j < j0 + n; ++j) p[j - j0] = DotRow<D>(qt, k + j * D, -m);
      for (int64_t t = 0; t < n; ++t) {
        p[t] = exp2_nonpositive(p[t]);
        l += p[t];
      }
      AccumulateRows<D>(p, v + j0 * D, n, acc);
    }

    for (int r = 0; r < rows; ++r) {
      if (!(l[r] >= 0x1p-40f)) {
        ExactQuery<D>(pb, pair, i + r, buf);
        continue;
      }
      const float inv = 1.f / l[r];
      float* o = pb.out + (b * pb.q_len + i + r) * row + h * D;
      for (int d = 0; d < D; ++d) o[d] = acc[d][r] * inv;
      // log Σ exp(scale·s) = ln2 · (shift in log2 units + log2 Σ 2^(s' − shift)).
      pb.lse[(b * pb.heads + h) * pb.q_len + i + r] = m[r] * 0.6931471805599453f + std::log(l[r]);
    }
  }
}

template <int D>
void Forward(const Problem& pb, const Workers& workers) {
  const int64_t tiles = (pb.q_len + kQueryTile - 1) / kQueryTile;
  ParallelFor<PairBuffers>(pb.batch * pb.heads * tiles, workers, [&](int64_t item, PairBuffers& buf) {
    const int64_t pair = item / tiles, i0 = item % tiles * kQueryTile;
    if (buf.packed_pair != pair) PackPair<D>(pb, pair, buf);
    QueryLanes<D>(pb, pair, i0, std::min(pb.q_len, i0 + kQueryTile), buf);
  });
}

// ---- Backward: dq, dk, dv from q, k, v, the output, its gradient and the log-sum-exp. ----
//
// With P = exp(scale·q kᵀ − lse) recomputed exactly (lse known, no shift to find), dP = dO vᵀ,
// Δ_i = dO_i · O_i and dS = P ∘ (dP − Δ):  dq = scale·dS k,  dk = scale·dSᵀ q,  dv = Pᵀ dO.
// One sweep, each query·key pair's P and dS computed once: a block of keys in the lanes (16, or 8
// with AVX2), looping over the queries, 64 at a time: their P and dS vectors, then the keys' dv
// and dk sums over them, then every 16 (8) queries' dS vectors (a square tile) transposed in
// registers to queries in the lanes and multiplied into those queries' dq, which accumulates in a
// buffer over the key blocks. (Two sweeps, one with the queries in the lanes for dq and one with
// the keys for dk and dv, computed P and dP twice: forward + backward of 16 × 8 heads × 1024 tokens
// took 156 ms with them against 127–132 ms with one on AVX-512. On AVX2 the one sweep updating dk
// and dv per query, with k, v, dk and dv of heads of 8 in 32 of the 16 registers, spilled them:
// 267–287 ms against 218–246 ms with the 64-query passes.)

struct Backward {
  const float *q, *k, *v, *out, *lse, *d_out;
  float *dq, *dk, *dv;
  int64_t batch, q_len, k_len, heads;
  float scale;
  // A pair's keys are split into `chunks` work items of `chunk_keys` keys (a multiple of 16) when
  // there are too few pairs to share between the threads; each chunk's dq then goes to
  // dq_parts [pairs][chunks][q_len][D], summed afterwards in chunk order.
  int64_t chunks = 1, chunk_keys = 0;
  float* dq_parts = nullptr;
};

// One pair's query rows, padded with zero rows to a multiple of 16 ([q_pad][D]): q in log2 units
// (q·scale·log2 e) and dO; per query the lse in log2 units and Δ (a padding row's zero dO gives it
// dS = 0 everywhere). dq: the dq accumulators, [q_pad / 16][D][16] (queries in the lanes).
struct BackwardBuffers {
  std::vector<float> q, d_out, lse2, delta, dq;
  int64_t packed_pair = -1;
};

template <int D>
void PackBackward(const Backward& pb, int64_t pair, BackwardBuffers& buf) {
  const int64_t b = pair / pb.heads, h = pair % pb.heads;
  const int64_t row = pb.heads * D;
  const int64_t q_pad = (pb.q_len + kLanes - 1) / kLanes * kLanes;
  const float to_log2 = pb.scale * 1.4426950408889634f;
  buf.q.assign(q_pad * D, 0.f);
  buf.d_out.assign(q_pad * D, 0.f);
  buf.lse2.assign(q_pad, 0.f);
  buf.delta.assign(q_pad, 0.f);
  buf.dq.resize(q_pad * D);
  for (int64_t i = 0; i < pb.q_len; ++i) {
    const int64_t at = (b * pb.q_len + i) * row + h * D;
    float delta = 0.f;
    for (int d = 0; d < D; ++d) {
      buf.q[i * D + d] = pb.q[at + d] * to_log2;
      buf.d_out[i * D + d] = pb.d_out[at + d];
      delta += pb.d_out[at + d] * pb.out[at + d];
    }
    buf.delta[i] = delta;
    buf.lse2[i] = pb.lse[(b * pb.heads + h) * pb.q_len + i] * 1.4426950408889634f;
  }
  buf.packed_pair = pair;
}

// rows[c][r] ← rows[r][c] for a kLanes × kLanes tile: log2(kLanes) rounds of two-source permutes,
// the round of size s swapping, in every 2s × 2s block, the off-diagonal s × s blocks.
template <int S>
inline void TransposeRound(vf rows[kLanes]) {
  vi take_low, take_high;  // lanes from a = rows[r] (0..kLanes-1) and b = rows[r + S] (kLanes..)
  for (int l = 0; l < kLanes; ++l) {
    take_low[l] = (l & S) ? kLanes + l - S : l;
    take_high[l] = (l & S) ? kLanes + l : l + S;
  }
  for (int r = 0; r < kLanes; ++r) {
    if (r & S) continue;
    const vf a = rows[r], b = rows[r + S];
    rows[r] = __builtin_shuffle(a, b, take_low);
    rows[r + S] = __builtin_shuffle(a, b, take_high);
  }
}

template <int S = kLanes / 2>
inline void TransposeTile(vf rows[kLanes]) {
  TransposeRound<S>(rows);
  if constexpr (S > 1) TransposeTile<S / 2>(rows);
}

constexpr int kBackwardQueries = 64;  // queries whose P and dS are held at a time (kLanes divides it)

// dk and dv of one chunk of one pair's keys, and the chunk's part of every query's dq. The keys'
// k, v, dk and dv (4·D vectors) do not all fit in registers, so each block of queries is taken in
// four passes: the logits and dP (k and v read from memory), P and dS, then dv and dk
// (AccumulateRows), then dq.
template <int D>
void KeyChunk(const Backward& pb, int64_t pair, int64_t chunk, BackwardBuffers& buf) {
  const int64_t b = pair / pb.heads, h = pair % pb.heads;
  const int64_t row = pb.heads * D;
  const int64_t q_pad = (pb.q_len + kLanes - 1) / kLanes * kLanes;
  const float* q = buf.q.data();
  const float* d_out = buf.d_out.data();
  float* dq = buf.dq.data();
  std::fill(buf.dq.begin(), buf.dq.end(), 0.f);
  const int64_t j_end = std::min(pb.k_len, (chunk + 1) * pb.chunk_keys);
  for (int64_t j = chunk * pb.chunk_keys; j < j_end; j += kLanes) {
    const int keys = static_cast<int>(std::min<int64_t>(kLanes, j_end - j));
    vf kt[D], vt[D], dk[D], dv[D];
    float k_rows[kLanes][D];  // the block's keys, for broadcasting into dq
    for (int d = 0; d < D; ++d) kt[d] = vt[d] = dk[d] = dv[d] = vf{};
    for (int c = 0; c < keys; ++c)
      for (int d = 0; d < D; ++d) {
        const int64_t at = (b * pb.k_len + j + c) * row + h * D + d;
        k_rows[c][d] = kt[d][c] = pb.k[at];
        vt[d][c] = pb.v[at];
      }
    // Lanes beyond `keys` (zero k and v) get some dS too; it is never read.
    for (int64_t i0 = 0; i0 < q_pad; i0 += kBackwardQueries) {
      const int64_t n = std::min<int64_t>(kBackwardQueries, q_pad - i0);
      vf p[kBackwardQueries], ds[kBackwardQueries];
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = i0 + r;
        p[r] = DotRow<D>(kt, q + i * D, splat(-buf.lse2[i]));       // logits (log2) − lse
        ds[r] = DotRow<D>(vt, d_out + i * D, splat(-buf.delta[i]));  // dP − Δ
      }
      for (int64_t r = 0; r < n; ++r) {
        p[r] = exp2_nonpositive(p[r]);
        ds[r] *= p[r];
      }
      AccumulateRows<D>(p, d_out + i0 * D, n, dv);
      AccumulateRows<D>(ds, q + i0 * D, n, dk);
      for (int64_t r = 0; r < n; r += kLanes) {
        TransposeTile(ds + r);  // ds[r + c]: key c's dS for the tile's queries
        vf_unaligned* acc = reinterpret_cast<vf_unaligned*>(dq) + (i0 + r) / kLanes * D;
        for (int c = 0; c < keys; ++c)
          for (int d = 0; d < D; ++d) acc[d] += ds[r + c] * k_rows[c][d];
      }
    }
    // dk = scale·Σ ds·q = Σ ds·q' / log2 e, as q' = q·scale·log2 e.
    for (int c = 0; c < keys; ++c)
      for (int d = 0; d < D; ++d) {
        const int64_t at = (b * pb.k_len + j + c) * row + h * D + d;
        pb.dk[at] = dk[d][c] * 0.6931471805599453f;
        pb.dv[at] = dv[d][c];
      }
  }
  for (int64_t i = 0; i < pb.q_len; ++i)
    for (int d = 0; d < D; ++d) {
      const float value = dq[(i / kLanes * D + d) * kLanes + i % kLanes] * pb.scale;
      if (pb.chunks == 1)
        pb.dq[(b * pb.q_len + i) * row + h * D + d] = value;
      else
        pb.dq_parts[((pair * pb.chunks + chunk) * pb.q_len + i) * D + d] = value;
    }
}

template <int D>
void BackwardPass(Backward pb, const Workers& workers) {
  const int64_t pairs = pb.batch * pb.heads;
  const int64_t blocks = (pb.k_len + kLanes - 1) / kLanes;
  // About 4 work items per thread: pairs whole if there are enough of them, else their keys split.
  const int64_t wanted = std::clamp<int64_t>((4 * workers.threads + pairs - 1) / pairs, 1, blocks);
  const int64_t chunk_blocks = (blocks + wanted - 1) / wanted;
  pb.chunk_keys = chunk_blocks * kLanes;
  pb.chunks = (blocks + chunk_blocks - 1) / chunk_blocks;
  std::vector<float> parts;
  if (pb.chunks > 1) {
    parts.resize(pairs * pb.chunks * pb.q_len * D);
    pb.dq_parts = parts.data();
  }
  ParallelFor<BackwardBuffers>(pairs * pb.chunks, workers, [&](int64_t item, BackwardBuffers& buf) {
    const int64_t pair = item / pb.chunks;
    if (buf.packed_pair != pair) PackBackward<D>(pb, pair, buf);
    KeyChunk<D>(pb, pair, item % pb.chunks, buf);
  });
  if (pb.chunks == 1) return;
  ParallelFor<int>(pairs, workers, [&](int64_t pair, int&) {
    const int64_t b = pair / pb.heads, h = pair % pb.heads;
    for (int64_t i = 0; i < pb.q_len; ++i)
      for (int d = 0; d < D; ++d) {
        float sum = 0.f;
        for (int64_t c = 0; c < pb.chunks; ++c) sum += pb.dq_parts[((pair * pb.chunks + c) * pb.q_len + i) * D + d];
        pb.dq[(b * pb.q_len + i) * pb.heads * D + h * D + d] = sum;
      }
  });
}

}  // namespace

// Head sizes compiled in: small heads, whose q·k and p·v products are too thin for matmuls (the
// blocked XLA implementation is as fast or faster from 32 channels per head on; Python side).
#define LDM_HEAD_DIMS(X) X(2) X(4) X(8) X(16)

// Runs run(std::integral_constant<int, D>{}) for the compiled head size D == dim; an error for any
// other size.
template <typename Run>
static ffi::Error WithHeadDim(int64_t dim, Run run) {
#define CASE(N)                            \
  if (dim == N) {                          \
    run(std::integral_constant<int, N>{}); \
    return ffi::Error::Success();          \
  }
  LDM_HEAD_DIMS(CASE)
#undef CASE
  return ffi::Error::InvalidArgument("head_dim not compiled into the fused attention kernel");
}

static ffi::Error AttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale,
                                   int64_t threads, ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be [B, L, H, D]");
  Problem pb{q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data(),
             qd[0], qd[1], kd[1], qd[2], qd[3], scale};
  if (pb.k_len == 0) return ffi::Error::InvalidArgument("no keys");
  const Workers workers(&pool, threads);
  return WithHeadDim(pb.dim, [&](auto dim) { Forward<decltype(dim)::value>(pb, workers); });
}

static ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale,
                                    int64_t threads, ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be [B, L, H, D]");
  Backward pb{q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(), lse.typed_data(),
              d_out.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(),
              qd[0], qd[1], kd[1], qd[2], scale};
  if (pb.k_len == 0) return ffi::Error::InvalidArgument("no keys");
  const Workers workers(&pool, threads);
  return WithHeadDim(qd[3], [&](auto dim) { BackwardPass<decltype(dim)::value>(pb, workers); });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmFusedAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmFusedAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
