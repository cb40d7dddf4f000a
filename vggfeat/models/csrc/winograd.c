/* Winograd F(4x4, 3x3) transforms for NHWC float32 tensors: vggfeat's CPU backend.
 *
 * Built on first use by vggfeat/models/winograd.py (cc -O3 -march=native -fopenmp), linked to
 * the OpenMP runtime torch already loaded, so these loops share torch's threads.
 *
 * A 3x3 stride-1 pad-1 convolution becomes, per 4x4 output tile, 36 elementwise products in the
 * transformed domain; summed over input channels they are 36 matrix products that the caller
 * runs with torch.bmm.  These two functions are the transforms around them:
 *   input:  x[N][H][W][C] → V[36][tiles][C]   (V = Bᵀ d B on each 6x6 input window)
 *   output: M[36][tiles][K] → y[N][H][W][K]    (y = Aᵀ m A + bias on each tile, then
 *           max(y, 0) if relu)
 * for the tiles [t0, t0 + count) of the image batch, tile t = (n·th + i)·tw + j.
 * Channels are the innermost, contiguous axis, so every step is a vector loop over channels.
 * The caller checks shapes: x, V, M and y are contiguous and sized as above.
 */
#include <omp.h>
#include <string.h>

#define CB 64 /* channels per step: 36 windows of CB floats stay in L1 */

typedef struct {
    const float *src; float *dst; const float *bias;
    long N, H, W, C, t0, count, first, last;
    int relu;
} job_t;

/* The 1-D input transform over n channels: o[a·os] = Σ_r Bᵀ[a][r] d[r·is]. */
static inline void bt6(const float *restrict d, long is, float *restrict o, long os, long n) {
    for (long c = 0; c < n; c++) {
        const float d0 = d[c], d1 = d[is + c], d2 = d[2 * is + c], d3 = d[3 * is + c],
                    d4 = d[4 * is + c], d5 = d[5 * is + c];
        o[c] = 4 * d0 - 5 * d2 + d4;
        o[os + c] = -4 * (d1 + d2) + d3 + d4;
        o[2 * os + c] = 4 * (d1 - d2) - d3 + d4;
        o[3 * os + c] = 2 * (d3 - d1) - d2 + d4;
        o[4 * os + c] = 2 * (d1 - d3) - d2 + d4;
        o[5 * os + c] = 4 * d1 - 5 * d3 + d5;
    }
}

/* The 1-D output transform over n channels: o[p·os] = Σ_r Aᵀ[p][r] m[r·is] (+ bias). */
static inline void at6(const float *restrict m, long is, float *restrict o, long os, long n,
                       const float *restrict bias) {
    for (long c = 0; c < n; c++) {
        const float p = m[is + c] + m[2 * is + c], q = m[is + c] - m[2 * is + c];
        const float r = m[3 * is + c] + m[4 * is + c], w = m[3 * is + c] - m[4 * is + c];
        const float b = bias ? bias[c] : 0.0f;
        o[c] = m[c] + p + r + b;
        o[os + c] = q + 2 * w + b;
        o[2 * os + c] = p + 4 * r + b;
        o[3 * os + c] = q + 8 * w + m[5 * is + c] + b;
    }
}

static void input_tiles(const job_t *a) {
    const long H = a->H, W = a->W, C = a->C, th = (H + 3) / 4, tw = (W + 3) / 4;
    const long stride = a->count * C;
    float d[36][CB], u[36][CB];
    for (long t = a->first; t < a->last; t++) {
        const long g = a->t0 + t, n = g / (th * tw), i = (g / tw) % th, j = g % tw;
        for (long c0 = 0; c0 < C; c0 += CB) {
            const long cb = C - c0 < CB ? C - c0 : CB;
            for (int r = 0; r < 6; r++) {
                const long y = 4 * i - 1 + r;
                for (int s = 0; s < 6; s++) {
                    const long x = 4 * j - 1 + s;
                    if (y < 0 || y >= H || x < 0 || x >= W)
                        memset(d[r * 6 + s], 0, sizeof(float) * cb);
                    else
                        memcpy(d[r * 6 + s], a->src + ((n * H + y) * W + x) * C + c0,
                               sizeof(float) * cb);
                }
            }
            for (int s = 0; s < 6; s++) /* columns: u[a][s] = Σ_r Bᵀ[a][r] d[r][s] */
                bt6(d[s], 6 * CB, u[s], 6 * CB, cb);
            for (int r = 0; r < 6; r++) /* rows, written to V[a·6+b][t][c] */
                bt6(u[r * 6], CB, a->dst + (r * 6) * stride + t * C + c0, stride, cb);
        }
    }
}

static void output_tiles(const job_t *a) {
    const long H = a->H, W = a->W, K = a->C, th = (H + 3) / 4, tw = (W + 3) / 4;
    const long stride = a->count * K;
    float u[24][CB], o[16][CB];
    for (long t = a->first; t < a->last; t++) {
        const long g = a->t0 + t, n = g / (th * tw), i = (g / tw) % th, j = g % tw;
        for (long k0 = 0; k0 < K; k0 += CB) {
            const long kb = K - k0 < CB ? K - k0 : CB;
            for (int s = 0; s < 6; s++) /* columns: u[p][s] = Σ_r Aᵀ[p][r] m[r][s] */
                at6(a->src + s * stride + t * K + k0, 6 * stride, u[s], 6 * CB, kb, 0);
            for (int r = 0; r < 4; r++) /* rows, plus bias */
                at6(u[r * 6], CB, o[r * 4], CB, kb, a->bias ? a->bias + k0 : 0);
            if (a->relu)
                for (int p = 0; p < 16; p++)
                    for (long k = 0; k < kb; k++)
                        o[p][k] = o[p][k] > 0.0f ? o[p][k] : 0.0f;
            for (int r0 = 0; r0 < 4; r0++) {
                const long y = 4 * i + r0;
                if (y >= H) break;
                for (int s = 0; s < 4; s++) {
                    const long x = 4 * j + s;
                    if (x >= W) break;
                    memcpy(a->dst + ((n * H + y) * W + x) * K + k0, o[r0 * 4 + s],
                           sizeof(float) * kb);
                }
            }
        }
    }
}


void wino_input(const float *x, float *V, long N, long H, long W, long C, long t0, long count) {
#pragma omp parallel
    {
        const long k = omp_get_thread_num(), n = omp_get_num_threads();
        job_t a = {x, V, 0, N, H, W, C, t0, count, count * k / n, count * (k + 1) / n, 0};
        input_tiles(&a);
    }
}

void wino_output(const float *M, float *y, const float *bias, long N, long H, long W, long K,
                 long t0, long count, int relu) {
#pragma omp parallel
    {
        const long k = omp_get_thread_num(), n = omp_get_num_threads();
        job_t a = {M, y, bias, N, H, W, K, t0, count, count * k / n, count * (k + 1) / n, relu};
        output_tiles(&a);
    }
}
