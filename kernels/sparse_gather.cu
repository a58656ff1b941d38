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

template <typename T, bool NHWC>
__device__ __forceinline__ void sparse_gather_impl(
    const T* __restrict__ x, const int* __restrict__ indices, T* __restrict__ out,
    int K, int N, int C, int H, int W, int th, int tw, int sh, int sw, int oy, int ox)
{
    const long long total = (long long)K * C * th * tw;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += step) {
        int c, i, j;
        long long k;
        if constexpr (NHWC) {
            c = (int)(o % C);
            long long r = o / C;
            j = (int)(r % tw); r /= tw;
            i = (int)(r % th);
            k = r / th;
        } else {
            j = (int)(o % tw);
            long long r = o / tw;
            i = (int)(r % th); r /= th;
            c = (int)(r % C);
            k = r / C;
        }
        const int n = indices[3 * k];
        const int y = indices[3 * k + 1] * sh + oy + i;
        const int xx = indices[3 * k + 2] * sw + ox + j;
        T v = T(0);
        if (n >= 0 && n < N && y >= 0 && y < H && xx >= 0 && xx < W) {
            const long long src = NHWC ? (((long long)n * H + y) * W + xx) * C + c
                                       : (((long long)n * C + c) * H + y) * W + xx;
            v = x[src];
        }
        out[o] = v;
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
