// 3×3 convolution, stride 1, zero padding of one pixel ('SAME'), for CPUs:
// out[b, y, x, o] = bias[o] + Σ_{i, j, c} x[b, y+i-1, x+j-1, c] · w[i, j, c, o]
// for float32 NHWC activations x [B, H, W, C] and HWIO weights [3, 3, C, O], O a multiple of 16.
//
// Called from JAX through the XLA FFI (ldm_jax/nn/conv.py; built by ldm_jax/nn/cpu_kernels.py with
// the system C++ compiler for the machine it runs on). A direct convolution: each tile keeps R
// output pixels of one row × V vectors of output channels in up to 24 of the 32 AVX-512
// registers (12 of AVX2's 16); per input channel it loads V weight vectors and broadcasts R
// input values. No im2col buffer: the tile's three
// input rows stay in L1, one output-channel block's weights in L2. Tiles on the image's border read
// their input through a small zero-padded copy instead of padding the whole input.
// The second kernel (below) is the weight gradient of the same convolution, for the backward pass.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

// The vector width and how many accumulators a tile keeps (of the 32 or 16 vector registers).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kAccumulators = 24, kTileVectors = 4;
#elif defined(__AVX__)
constexpr int kLanes = 8, kAccumulators = 12, kTileVectors = 2;
#else
constexpr int kLanes = 4, kAccumulators = 12, kTileVectors = 2;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

struct Problem {
  const float* x;   // [B, H, W, C]
  const float* w;   // [O / K, 3, 3, C, K]: each block of K output channels contiguous
  const float* bias;
  float* out;       // [B, H, W, O]
  int64_t batch, height, width, in_channels, out_channels;
  int64_t block;    // K, the packed block of output channels (16, 32 or 64)
};

// The input channels [begin, end) that one pass over the tiles sums: at most kChunk, so that the
// pass's weights (3·3·kChunk·K floats, 576 KiB for K = 64) stay in L2 while the row's tiles reuse them.
// The first pass starts from the bias, later ones from the output the earlier passes wrote.
constexpr int64_t kChunk = 256;
struct Channels {
  int64_t begin, end;
};

// R output pixels of one row (consecutive x) × V vectors of output channels (kLanes each), which
// start at `w`, `bias` and `out` within the packed block of K channels.
// `in` points at the input pixel above and left of the tile's first output pixel; `row` is the
// distance between input rows.
template <int R, int V>
inline void Tile(const Problem& pb, const float* in, int64_t row, const float* w, const float* bias, float* out,
                 Channels cs) {
  const int64_t c_in = pb.in_channels, c_out = pb.out_channels, k = pb.block;
  vf acc[R][V];
  for (int v = 0; v < V; ++v) {
    const vf b = Load(bias + kLanes * v);
    for (int r = 0; r < R; ++r) acc[r][v] = cs.begin == 0 ? b : Load(out + r * c_out + kLanes * v);
  }
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const float* px = in + i * row + j * c_in;
      const float* wk = w + (i * 3 + j) * c_in * k;
      for (int64_t c = cs.begin; c < cs.end; ++c) {
        vf wv[V];
        for (int v = 0; v < V; ++v) wv[v] = Load(wk + c * k + v * kLanes);
        for (int r = 0; r < R; ++r) {
          const float a = px[r * c_in + c];
          for (int v = 0; v < V; ++v) acc[r][v] += a * wv[v];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(out + r * c_out + kLanes * v, acc[r][v]);
}

// The tile of `n` ≤ R pixels over all of the block's K channels, V vectors at a time (the
// tile's input pixels stay in L1 between them).
template <int R, int V>
inline void BlockTile(int n, const Problem& pb, const float* in, int64_t row, const float* w, const float* bias,
                      float* out, Channels cs) {
  if constexpr (R > 0) {
    if (n < R) return BlockTile<R - 1, V>(n, pb, in, row, w, bias, out, cs);
    for (int64_t o = 0; o < pb.block; o += V * kLanes) Tile<R, V>(pb, in, row, w + o, bias + o, out + o, cs);
  }
}

// Per thread: the zero-padded input of one border tile, 3 rows × (R + 2) pixels × C.
struct EdgeBuffer {
  std::vector<float> data;
};

// A tile of `n` ≤ R output pixels at (y, x0) of example b. Interior tiles read the input in place;
// tiles touching the border first copy their 3 × (n + 2) input pixels into `edge` with zeros outside.
template <int R, int V>
inline void TileAt(int n, const Problem& pb, int64_t b, int64_t y, int64_t x0, const float* w, const float* bias,
                   float* out, Channels cs, EdgeBuffer& edge) {
  const int64_t c = pb.in_channels, height = pb.height, width = pb.width;
  const float* image = pb.x + b * height * width * c;
  const float* in;
  int64_t row;
  if (y > 0 && y + 1 < height && x0 > 0 && x0 + n < width) {
    in = image + ((y - 1) * width + (x0 - 1)) * c;
    row = width * c;
  } else {
    row = (R + 2) * c;
    edge.data.assign(3 * row, 0.0f);
    for (int i = 0; i < 3; ++i) {
      const int64_t yy = y + i - 1;
      if (yy < 0 || yy >= height) continue;
      const int64_t first = std::max<int64_t>(x0 - 1, 0), last = std::min<int64_t>(x0 + n, width - 1);
      std::memcpy(edge.data.data() + i * row + (first - (x0 - 1)) * c, image + (yy * width + first) * c,
                  (last - first + 1) * c * sizeof(float));
    }
    in = edge.data.data();
  }
  BlockTile<R, V>(n, pb, in, row, w, bias, out, cs);
}

// Output rows [first, last) (rows of all examples, counted as b·H + y) of one block of K output
// channels, in tiles of R pixels: one pass over the rows per chunk of input channels, so that each
// chunk's weights serve every tile of the rows while they are in L2.
template <int R, int V>
void Rows(const Problem& pb, int64_t first, int64_t last, int64_t block, EdgeBuffer& edge) {
  const int64_t o0 = block * pb.block;
  const float* w = pb.w + block * 9 * pb.in_channels * pb.block;  // this block's packed weights
  for (int64_t c0 = 0; c0 < pb.in_channels; c0 += kChunk) {
    const Channels cs{c0, std::min(c0 + kChunk, pb.in_channels)};
    for (int64_t by = first; by < last; ++by) {
      float* out = pb.out + by * pb.width * pb.out_channels + o0;
      for (int64_t x = 0; x < pb.width; x += R) {
        const int n = static_cast<int>(std::min<int64_t>(R, pb.width - x));
        TileAt<R, V>(n, pb, by / pb.height, by % pb.height, x, w, pb.bias + o0, out + x * pb.out_channels, cs, edge);
      }
    }
  }
}

// Work items: a block of output channels × a group of rows with at least ~96 output pixels in all
// (the weights' reuse), block-major so that a thread's consecutive items share the block's weights.
template <int R, int V>
void Convolve(const Problem& pb, const Workers& workers) {
  const int64_t blocks = pb.out_channels / pb.block, rows = pb.batch * pb.height;
  const int64_t group = std::min<int64_t>(rows, std::max<int64_t>(1, 96 / pb.width));
  const int64_t groups = (rows + group - 1) / group;
  ParallelFor<EdgeBuffer>(blocks * groups, workers, [&](int64_t item, EdgeBuffer& edge) {
    const int64_t block = item / groups, first = item % groups * group;
    Rows<R, V>(pb, first, std::min(first + group, rows), block, edge);
  });
}

// Tiles of V vectors (up to kTileVectors, the block's K channels) × R pixels fill the
// accumulators: with AVX-512 6 pixels × 4 vectors of 16 channels, or 12 × 2 (12 × 1 for K = 16);
// with AVX2 6 × 2 vectors of 8, as many times as K needs.
template <int K>
void ConvolveChannels(const Problem& pb, const Workers& workers) {
  constexpr int V = std::min(K / kLanes, kTileVectors);
  Convolve<std::min(kAccumulators / V, 12), V>(pb, workers);
}

static ffi::Error Conv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::F32> out, int64_t threads, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || wd.size() != 5 || od.size() != 4 || wd[1] != 3 || wd[2] != 3 || wd[3] != xd[3] ||
      od[0] != xd[0] || od[1] != xd[1] || od[2] != xd[2] || od[3] != wd[0] * wd[4] ||
      (wd[4] != 16 && wd[4] != 32 && wd[4] != 64))
    return ffi::Error::InvalidArgument(
        "conv3x3: x [B, H, W, C], w [O / K, 3, 3, C, K] with K in 16, 32, 64, out [B, H, W, O]");
  const Problem pb{x.typed_data(), w.typed_data(), bias.typed_data(), out->typed_data(),
                   od[0], od[1], od[2], xd[3], od[3], wd[4]};
  const Workers workers(&pool, threads);
  if (wd[4] == 64) ConvolveChannels<64>(pb, workers);
  else if (wd[4] == 32) ConvolveChannels<32>(pb, workers);
  else ConvolveChannels<16>(pb, workers);
  return ffi::Error::Success();
}

// ---- Weight gradient: dw[i, j, c, o] = Σ_{b, y, x} x[b, y+i-1, x+j-1, c] · g[b, y, x, o] ----
// (g the gradient of the output; taps that fall outside the image contribute nothing.)
// A tile keeps N input channels × V vectors of output channels in registers and sums over the
// pixels of a block of rows: per pixel V loads of g and N broadcasts of x. The block (rows of
// ~4 Ki input floats) stays in L1 while all taps and channel tiles pass over it (with blocks of
// 64 Ki floats, in L2, the 256×256×64 gradient at batch 8 took 532–594 ms against 426–444 ms, AVX2).

struct GradProblem {
  const float* x;  // [B, H, W, C]
  const float* g;  // [B, H, W, O]
  int64_t batch, height, width, in_channels, out_channels;
};

// Adds to dw (one output-channel block's V·kLanes columns of tap (i, j), channels [c0, c0 + N)) the sum
// over rows [first, last) (counted as b·H + y) of one tap's products.
template <int N, int V>
inline void GradTile(const GradProblem& pb, int64_t first, int64_t last, int i, int j, int64_t c0, int64_t o0,
                     float* dw) {
  const int64_t c = pb.in_channels, o = pb.out_channels, height = pb.height, width = pb.width;
  const int64_t x_first = j == 0 ? 1 : 0, x_last = j == 2 ? width - 1 : width;  // output columns with an input
  vf acc[N][V];
  for (int n = 0; n < N; ++n)
    for (int v = 0; v < V; ++v) acc[n][v] = vf{};
  for (int64_t by = first; by < last; ++by) {
    const int64_t yy = by % height + i - 1;
    if (yy < 0 || yy >= height) continue;
    const float* gp = pb.g + (by * width + x_first) * o + o0;
    const float* xp = pb.x + ((by + i - 1) * width + x_first + j - 1) * c + c0;
    for (int64_t px = x_first; px < x_last; ++px, gp += o, xp += c) {
      vf gv[V];
      for (int v = 0; v < V; ++v) gv[v] = Load(gp + v * kLanes);
      for (int n = 0; n < N; ++n) {
        const float a = xp[n];
        for (int v = 0; v < V; ++v) acc[n][v] += a * gv[v];
      }
    }
  }
  float* d = dw + ((i * 3 + j) * c + c0) * o + o0;
  for (int n = 0; n < N; ++n)
    for (int v = 0; v < V; ++v) Store(d + n * o + v * kLanes, Load(d + n * o + v * kLanes) + acc[n][v]);
}

// Adds the sums over rows [first, last) to dw [3, 3, C, O], in blocks of rows that stay in L1.
template <int N, int V>
void GradRows(const GradProblem& pb, int64_t first, int64_t last, float* dw) {
  const int64_t block = std::max<int64_t>(1, (4 << 10) / (pb.width * pb.in_channels));
  for (int64_t b0 = first; b0 < last; b0 += block) {
    const int64_t b1 = std::min(b0 + block, last);
    for (int64_t o0 = 0; o0 < pb.out_channels; o0 += V * kLanes)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
          for (int64_t c0 = 0; c0 < pb.in_channels; c0 += N) GradTile<N, V>(pb, b0, b1, i, j, c0, o0, dw);
  }
}

// Two work items per thread (so that a pool thread that starts late leaves less to the caller),
// each summing a contiguous share of the rows into its own copy of dw (the first into the result),
// added up at the end: the same order of sums for a given thread count.
template <int N, int V>
void WeightGrad(const GradProblem& pb, float* dw, const Workers& workers) {
  const int64_t rows = pb.batch * pb.height, size = 9 * pb.in_channels * pb.out_channels;
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(2 * workers.threads, rows));
  std::vector<float> partial((items - 1) * size, 0.0f);
  std::fill(dw, dw + size, 0.0f);
  ParallelFor<char>(items, workers, [&](int64_t item, char&) {
    float* sums = item == 0 ? dw : partial.data() + (item - 1) * size;
    GradRows<N, V>(pb, rows * item / items, rows * (item + 1) / items, sums);
  });
  for (int64_t item = 1; item < items; ++item) {
    const float* p = partial.data() + (item - 1) * size;
    for (int64_t k = 0; k < size; ++k) dw[k] += p[k];
  }
}

static ffi::Error Conv3x3WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw,
                                    int64_t threads, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2] ||
      wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || wd[3] != gd[3] || xd[3] % 8 != 0 || gd[3] % 16 != 0)
    return ffi::Error::InvalidArgument(
        "conv3x3 weight gradient: x [B, H, W, C], g [B, H, W, O], dw [3, 3, C, O], C a multiple of 8, O of 16");
  const GradProblem pb{x.typed_data(), g.typed_data(), xd[0], xd[1], xd[2], xd[3], gd[3]};
  const Workers workers(&pool, threads);
  float* out = dw->typed_data();
  if constexpr (kLanes == 16) {  // 16 accumulators each
    if (pb.out_channels % 64 == 0) WeightGrad<4, 4>(pb, out, workers);
    else if (pb.out_channels % 32 == 0) WeightGrad<8, 2>(pb, out, workers);
    else WeightGrad<8, 1>(pb, out, workers);
  } else {  // 8 accumulators of the 16 registers
    WeightGrad<4, 16 / kLanes>(pb, out, workers);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmConv3x3WeightGrad, Conv3x3WeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
