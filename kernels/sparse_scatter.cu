// sparse_scatter: write (or add) a stack of tiles back into a dense map, the inverse of
// sparse_gather.
//
//   base[n, :, ty*sh + oy + i, tx*sw + ox + j]  =  tiles[k, :, i, j]    (overwrite kernels)
//                                               +=  tiles[k, :, i, j]    (add kernels, atomicAdd)
// for the k-th row (n, ty, tx) of indices (K, 3) int32; cells off the map (and rows whose n is
// not a valid batch index) are dropped.
//
// Layouts: NCHW  tiles (K, C, th, tw) -> base (N, C, H, W)
//          NHWC  tiles (K, th, tw, C) -> base (N, H, W, C)
// One thread per tile element, grid-stride loop over K*C*th*tw, coalesced reads of the tiles.
// Add kernels use atomicAdd, so tiles that overlap (a halo wider than the stride) accumulate
// correctly; the order of the additions, and so the last bits of a float sum, is unspecified.
// Overwrite kernels are plain stores: where tiles overlap, which tile's value lands is
// unspecified (the callers scatter non-overlapping output tiles). Overwrite kernels move bits
// (b16/b32/b64 serve every element type of that width); add kernels exist for f32 and f64.

// Work-item index type: unsigned 32-bit while K*C*th*tw fits (integer division by the tile
// sizes is much cheaper in 32 bits), 64-bit beyond. The CPU tests also build with
// SPARSE_DETECTOR_INDEX32_MAX=0 to run the 64-bit path.
#ifndef SPARSE_DETECTOR_INDEX32_MAX
#define SPARSE_DETECTOR_INDEX32_MAX 0x7fffffffLL
#endif

template <typename I, typename T, bool NHWC, bool ADD>
__device__ __forceinline__ void sparse_scatter_loop(
    const T* __restrict__ tiles, const int* __restrict__ indices, T* __restrict__ base,
    I total, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    const I step = (I)gridDim.x * blockDim.x;
    for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += step) {
        int c, i, j;
        I k;
        if constexpr (NHWC) {
            c = (int)(o % (I)C);
            I r = o / (I)C;
            j = (int)(r % (I)tw); r /= (I)tw;
            i = (int)(r % (I)th);
            k = r / (I)th;
        } else {
            j = (int)(o % (I)tw);
            I r = o / (I)tw;
            i = (int)(r % (I)th); r /= (I)th;
            c = (int)(r % (I)C);
            k = r / (I)C;
        }
        const int n = indices[3 * (long long)k];
        const int y = indices[3 * (long long)k + 1] * sh + oy + i;
        const int xx = indices[3 * (long long)k + 2] * sw + ox + j;
        if (n < 0 || n >= N || y < 0 || y >= H || xx < 0 || xx >= W) continue;
        const long long dst = NHWC ? (((long long)n * H + y) * W + xx) * C + c
                                   : (((long long)n * C + c) * H + y) * W + xx;
        if constexpr (ADD) {
            atomicAdd(base + dst, tiles[o]);
        } else {
            base[dst] = tiles[o];
        }
    }
}

template <typename T, bool NHWC, bool ADD>
__device__ __forceinline__ void sparse_scatter_impl(
    const T* __restrict__ tiles, const int* __restrict__ indices, T* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    const long long total = (long long)K * C * th * tw;
    if (total <= SPARSE_DETECTOR_INDEX32_MAX) {
        sparse_scatter_loop<unsigned int, T, NHWC, ADD>(tiles, indices, base, (unsigned int)total, N, C, H, W, th, tw, sh, sw, oy, ox);
    } else {
        sparse_scatter_loop<unsigned long long, T, NHWC, ADD>(tiles, indices, base, (unsigned long long)total, N, C, H, W, th, tw, sh, sw, oy, ox);
    }
}

extern "C" __global__ void sparse_scatter_nchw_b16(
    const unsigned short* __restrict__ tiles, const int* __restrict__ indices, unsigned short* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned short, false, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_nhwc_b16(
    const unsigned short* __restrict__ tiles, const int* __restrict__ indices, unsigned short* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned short, true, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_nchw_b32(
    const unsigned int* __restrict__ tiles, const int* __restrict__ indices, unsigned int* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned int, false, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_nhwc_b32(
    const unsigned int* __restrict__ tiles, const int* __restrict__ indices, unsigned int* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned int, true, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_nchw_b64(
    const unsigned long long* __restrict__ tiles, const int* __restrict__ indices, unsigned long long* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned long long, false, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_nhwc_b64(
    const unsigned long long* __restrict__ tiles, const int* __restrict__ indices, unsigned long long* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<unsigned long long, true, false>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_add_nchw_f32(
    const float* __restrict__ tiles, const int* __restrict__ indices, float* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<float, false, true>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_add_nhwc_f32(
    const float* __restrict__ tiles, const int* __restrict__ indices, float* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<float, true, true>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_add_nchw_f64(
    const double* __restrict__ tiles, const int* __restrict__ indices, double* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<double, false, true>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_scatter_add_nhwc_f64(
    const double* __restrict__ tiles, const int* __restrict__ indices, double* __restrict__ base,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_scatter_impl<double, true, true>(tiles, indices, base, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}
