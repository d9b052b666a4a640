// 3×3 convolution, stride 1, zero padding of one pixel ('SAME'), for CPUs:
// out[b, y, x, o] = bias[o] + Σ_{i, j, c} x[b, y+i-1, x+j-1, c] · w[i, j, c, o]
// for float32 NHWC activations x [B, H, W, C] and HWIO weights [3, 3, C, O], O a multiple of 16.
//
// Called from JAX through the XLA FFI (ldm_jax/nn/conv.py; built by ldm_jax/nn/cpu_kernels.py with
// the system C++ compiler for the machine it runs on). A direct convolution: each tile keeps R
// output pixels of one row × V·16 output channels in 24 (or 16) vector registers; per input channel
// it loads V weight vectors and broadcasts R input values. No im2col buffer: the tile's three
// input rows stay in L1, one output-channel block's weights in L2. Tiles on the image's border read
// their input through a small zero-padded copy instead of padding the whole input.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

struct Problem {
  const float* x;   // [B, H, W, C]
  const float* w;   // [3, 3, C, O]
  const float* bias;
  float* out;       // [B, H, W, O]
  int64_t batch, height, width, in_channels, out_channels;
};

// R output pixels of one row (consecutive x) × V vectors of 16 output channels.
// `in` points at the input pixel above and left of the tile's first output pixel; `row` is the
// distance between input rows.
template <int R, int V>
inline void Tile(const Problem& pb, const float* in, int64_t row, const float* w, const float* bias, float* out) {
  const int64_t c_in = pb.in_channels, c_out = pb.out_channels;
  vf acc[R][V];
  for (int v = 0; v < V; ++v) {
    const vf b = Load(bias + kLanes * v);
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const float* px = in + i * row + j * c_in;
      const float* wk = w + (i * 3 + j) * c_in * c_out;
      for (int64_t c = 0; c < c_in; ++c) {
        vf wv[V];
        for (int v = 0; v < V; ++v) wv[v] = Load(wk + c * c_out + kLanes * v);
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

// A tile of `n` < R pixels (the end of a row that R does not divide).
template <int N, int V>
inline void ShortTile(int n, const Problem& pb, const float* in, int64_t row, const float* w, const float* bias,
                      float* out) {
  if constexpr (N > 0) {
    if (n == N) return Tile<N, V>(pb, in, row, w, bias, out);
    ShortTile<N - 1, V>(n, pb, in, row, w, bias, out);
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
                   float* out, EdgeBuffer& edge) {
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
  if (n == R) return Tile<R, V>(pb, in, row, w, bias, out);
  ShortTile<R - 1, V>(n, pb, in, row, w, bias, out);
}

// One output row of one block of V·16 output channels, in tiles of R pixels.
template <int R, int V>
void Row(const Problem& pb, int64_t b, int64_t y, int64_t block, EdgeBuffer& edge) {
  const int64_t o0 = block * V * kLanes;
  float* out = pb.out + ((b * pb.height + y) * pb.width) * pb.out_channels + o0;
  for (int64_t x = 0; x < pb.width; x += R) {
    const int n = static_cast<int>(std::min<int64_t>(R, pb.width - x));
    TileAt<R, V>(n, pb, b, y, x, pb.w + o0, pb.bias + o0, out + x * pb.out_channels, edge);
  }
}

template <int R, int V>
void Convolve(const Problem& pb, int threads) {
  const int64_t blocks = pb.out_channels / (V * kLanes);
  ParallelFor<EdgeBuffer>(pb.batch * pb.height * blocks, threads, [&](int64_t item, EdgeBuffer& edge) {
    const int64_t block = item % blocks, by = item / blocks;
    Row<R, V>(pb, by / pb.height, by % pb.height, block, edge);
  });
}

// Tiles of R pixels fill 24 accumulators: 6 pixels × 4 vectors, or 12 × 2 (12 × 1 for 16 channels).
template <int V>
void ConvolveChannels(const Problem& pb, int threads) {
  Convolve<V == 4 ? 6 : 12, V>(pb, threads);
}

static ffi::Error Conv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || od.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] ||
      od[0] != xd[0] || od[1] != xd[1] || od[2] != xd[2] || od[3] != wd[3] || wd[3] % kLanes)
    return ffi::Error::InvalidArgument("conv3x3: x [B, H, W, C], w [3, 3, C, O], out [B, H, W, O], O % 16 == 0");
  const Problem pb{x.typed_data(), w.typed_data(), bias.typed_data(), out->typed_data(),
                   od[0], od[1], od[2], xd[3], od[3]};
  const int n = threads > 0 ? static_cast<int>(threads) : NumThreads();
  if (pb.out_channels % (4 * kLanes) == 0) ConvolveChannels<4>(pb, n);
  else if (pb.out_channels % (2 * kLanes) == 0) ConvolveChannels<2>(pb, n);
  else ConvolveChannels<1>(pb, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("threads"));
