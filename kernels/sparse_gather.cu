// sparse_gather: copy the windows of the active tiles out of a dense map into a stack of tiles.
//
//   out[k, :, i, j] = x[n, :, ty*sh + oy + i, tx*sw + ox + j]   (zero where that cell is off the map
//                                                                or n is not a valid batch index)
// for the k-th row (n, ty, tx) of indices (K, 3) int32.
//
// Layouts: NCHW  x (N, C, H, W)  -> out (K, C, th, tw)
//          NHWC  x (N, H, W, C)  -> out (K, th, tw, C)
// One thread per output element, grid-stride loop over K*C*th*tw; consecutive threads write
// consecutive output elements (coalesced), and read along a map row (NCHW) or along channels
// (NHWC). Pure copies: the kernels move bits, so one kernel serves every element type of a width
// (b16: float16/bfloat16/int16, b32: float32/int32, b64: float64/int64).

// Work-item index type: unsigned 32-bit while K*C*th*tw fits (integer division by the tile
// sizes is much cheaper in 32 bits), 64-bit beyond. The CPU tests also build with
// SPARSE_DETECTOR_INDEX32_MAX=0 to run the 64-bit path.
#ifndef SPARSE_DETECTOR_INDEX32_MAX
#define SPARSE_DETECTOR_INDEX32_MAX 0x7fffffffLL
#endif

template <typename I, typename T, bool NHWC>
__device__ __forceinline__ void sparse_gather_loop(
    const T* __restrict__ x, const int* __restrict__ indices, T* __restrict__ out,
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
        T v = T(0);
        if (n >= 0 && n < N && y >= 0 && y < H && xx >= 0 && xx < W) {
            const long long src = NHWC ? (((long long)n * H + y) * W + xx) * C + c
                                       : (((long long)n * C + c) * H + y) * W + xx;
            v = x[src];
        }
        out[o] = v;
    }
}

template <typename T, bool NHWC>
__device__ __forceinline__ void sparse_gather_impl(
    const T* __restrict__ x, const int* __restrict__ indices, T* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    const long long total = (long long)K * C * th * tw;
    if (total <= SPARSE_DETECTOR_INDEX32_MAX) {
        sparse_gather_loop<unsigned int, T, NHWC>(x, indices, out, (unsigned int)total, N, C, H, W, th, tw, sh, sw, oy, ox);
    } else {
        sparse_gather_loop<unsigned long long, T, NHWC>(x, indices, out, (unsigned long long)total, N, C, H, W, th, tw, sh, sw, oy, ox);
    }
}

extern "C" __global__ void sparse_gather_nchw_b16(
    const unsigned short* __restrict__ x, const int* __restrict__ indices, unsigned short* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned short, false>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_gather_nhwc_b16(
    const unsigned short* __restrict__ x, const int* __restrict__ indices, unsigned short* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned short, true>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_gather_nchw_b32(
    const unsigned int* __restrict__ x, const int* __restrict__ indices, unsigned int* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned int, false>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_gather_nhwc_b32(
    const unsigned int* __restrict__ x, const int* __restrict__ indices, unsigned int* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned int, true>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_gather_nchw_b64(
    const unsigned long long* __restrict__ x, const int* __restrict__ indices, unsigned long long* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned long long, false>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}

extern "C" __global__ void sparse_gather_nhwc_b64(
    const unsigned long long* __restrict__ x, const int* __restrict__ indices, unsigned long long* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    sparse_gather_impl<unsigned long long, true>(x, indices, out, K, N, C, H, W, th, tw, sh, sw, oy, ox);
}
