// reduce_mask: pool a dense computation mask over a grid of (possibly overlapping) tiles and flag
// the tiles whose pooled value exceeds a threshold (SBNet's "reduce mask" step).
//
// Layout: mask is (N, H, W) float32 (reduce_mask_f32) or float64 (reduce_mask_f64), contiguous;
// pooled has the mask's type. Outputs are per tile, (N, Ty, Tx) contiguous:
//   pooled[n, ty, tx]  the max (avg == 0) or mean (avg != 0) of mask over the tile's window
//                      rows [ty*sh + oy, ty*sh + oy + th) x cols [tx*sw + ox, tx*sw + ox + tw),
//                      clipped to the map, stored in the mask's type; 0 when the window has no
//                      in-map cell. A NaN in the window gives NaN (never active), as torch's
//                      pooling does.
//   active[n, ty, tx]  1 iff the window has an in-map cell and its pooled value > threshold,
//                      else 0. The comparison is done in double, with the threshold passed as
//                      a double, for both mask types.
// The mean is the window's sum in double (cells added in row-major order) divided in double by
// the number of in-map cells, and that double mean (not its float rounding) is compared: the
// same arithmetic as the torch backend (reduce_mask in torch_backend.py: float64 sum and
// division, float64 comparison), so both backends pick the same tiles, ties included. For 0/1
// masks the double sum is exact, so the decision does not depend on the summation order.
// The host turns `active` into sorted (n, ty, tx) indices with an ordered stream compaction
// (torch.nonzero), so the result is deterministic; this kernel only classifies tiles.
//
// One thread per tile, grid-stride loop. No shared memory, no __syncthreads: every thread is
// independent, which is also what lets the CPU emulation run threads one after another.

template <typename T>
__device__ __forceinline__ void reduce_mask_impl(
    const T* __restrict__ mask, T* __restrict__ pooled, int* __restrict__ active,
    int N, int H, int W, int Ty, int Tx,
    int th, int tw, int sh, int sw, int oy, int ox,
    double threshold, int avg)
{
    const long long total = (long long)N * Ty * Tx;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int tx = (int)(t % Tx);
        const long long r = t / Tx;
        const int ty = (int)(r % Ty);
        const int n = (int)(r / Ty);

        const int y_lo = ty * sh + oy;
        const int x_lo = tx * sw + ox;
        const int y0 = max(y_lo, 0);
        const int x0 = max(x_lo, 0);
        const int y1 = min(y_lo + th, H);
        const int x1 = min(x_lo + tw, W);

        const T* plane = mask + (long long)n * H * W;
        T value = T(0);
        int flag = 0;
        if (y0 < y1 && x0 < x1) {
            if (avg) {
                double sum = 0.0;
                for (int y = y0; y < y1; ++y) {
                    const T* row = plane + (long long)y * W;
                    for (int x = x0; x < x1; ++x) sum += (double)row[x];
                }
                const double mean = sum / (double)((long long)(y1 - y0) * (x1 - x0));
                value = (T)mean;
                flag = mean > threshold ? 1 : 0;
            } else {
                value = plane[(long long)y0 * W + x0];
                for (int y = y0; y < y1; ++y) {
                    const T* row = plane + (long long)y * W;
                    for (int x = x0; x < x1; ++x) {
                        const T v = row[x];
                        if (v > value || v != v) value = v;  // a NaN in the window wins (as torch)
                    }
                }
                flag = (double)value > threshold ? 1 : 0;
            }
        }
        pooled[t] = value;
        active[t] = flag;
    }
}

extern "C" __global__ void reduce_mask_f32(
    const float* __restrict__ mask, float* __restrict__ pooled, int* __restrict__ active,
    int N, int H, int W, int Ty, int Tx, int th, int tw, int sh, int sw, int oy, int ox,
    double threshold, int avg)
{
    reduce_mask_impl<float>(mask, pooled, active, N, H, W, Ty, Tx, th, tw, sh, sw, oy, ox,
                            threshold, avg);
}

extern "C" __global__ void reduce_mask_f64(
    const double* __restrict__ mask, double* __restrict__ pooled, int* __restrict__ active,
    int N, int H, int W, int Ty, int Tx, int th, int tw, int sh, int sw, int oy, int ox,
    double threshold, int avg)
{
    reduce_mask_impl<double>(mask, pooled, active, N, H, W, Ty, Tx, th, tw, sh, sw, oy, ox,
                             threshold, avg);
}
