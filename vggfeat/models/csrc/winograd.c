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

static void input_tiles(const job_t *a) {
    const long H = a->H, W = a->W, C = a->C, th = (H + 3) / 4, tw = (W + 3) / 4;
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
            /* columns: u[a][s] = Σ_r Bᵀ[a][r] d[r][s] */
            for (int s = 0; s < 6; s++) {
                float *d0 = d[s], *d1 = d[6 + s], *d2 = d[12 + s], *d3 = d[18 + s],
                      *d4 = d[24 + s], *d5 = d[30 + s];
                for (long c = 0; c < cb; c++) {
                    u[s][c] = 4 * d0[c] - 5 * d2[c] + d4[c];
                    u[6 + s][c] = -4 * (d1[c] + d2[c]) + d3[c] + d4[c];
                    u[12 + s][c] = 4 * (d1[c] - d2[c]) - d3[c] + d4[c];
                    u[18 + s][c] = 2 * (d3[c] - d1[c]) - d2[c] + d4[c];
                    u[24 + s][c] = 2 * (d1[c] - d3[c]) - d2[c] + d4[c];
                    u[30 + s][c] = 4 * d1[c] - 5 * d3[c] + d5[c];
                }
            }
            /* rows: V[a][b] = Σ_s u[a][s] B[s][b], written to V[a·6+b][t][c] */
            const long stride = a->count * C;
            for (int r = 0; r < 6; r++) {
                float *u0 = u[r * 6], *u1 = u[r * 6 + 1], *u2 = u[r * 6 + 2], *u3 = u[r * 6 + 3],
                      *u4 = u[r * 6 + 4], *u5 = u[r * 6 + 5];
                float *v = a->dst + (r * 6) * stride + t * C + c0;
                for (long c = 0; c < cb; c++) {
                    v[c] = 4 * u0[c] - 5 * u2[c] + u4[c];
                    v[stride + c] = -4 * (u1[c] + u2[c]) + u3[c] + u4[c];
                    v[2 * stride + c] = 4 * (u1[c] - u2[c]) - u3[c] + u4[c];
                    v[3 * stride + c] = 2 * (u3[c] - u1[c]) - u2[c] + u4[c];
                    v[4 * stride + c] = 2 * (u1[c] - u3[c]) - u2[c] + u4[c];
                    v[5 * stride + c] = 4 * u1[c] - 5 * u3[c] + u5[c];
                }
            }
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
            /* columns: u[p][s] = Σ_r Aᵀ[p][r] m[r][s] */
            for (int s = 0; s < 6; s++) {
                const float *m0 = a->src + s * stride + t * K + k0, *m1 = m0 + 6 * stride,
                            *m2 = m0 + 12 * stride, *m3 = m0 + 18 * stride,
                            *m4 = m0 + 24 * stride, *m5 = m0 + 30 * stride;
                for (long k = 0; k < kb; k++) {
                    const float p = m1[k] + m2[k], q = m1[k] - m2[k];
                    const float r = m3[k] + m4[k], w = m3[k] - m4[k];
                    u[s][k] = m0[k] + p + r;
                    u[6 + s][k] = q + 2 * w;
                    u[12 + s][k] = p + 4 * r;
                    u[18 + s][k] = q + 8 * w + m5[k];
                }
            }
            /* rows, plus bias, then the ReLU if fused */
            for (int r0 = 0; r0 < 4; r0++) {
                float *u0 = u[r0 * 6], *u1 = u[r0 * 6 + 1], *u2 = u[r0 * 6 + 2],
                      *u3 = u[r0 * 6 + 3], *u4 = u[r0 * 6 + 4], *u5 = u[r0 * 6 + 5];
                const float *b = a->bias ? a->bias + k0 : 0;
                for (long k = 0; k < kb; k++) {
                    const float p = u1[k] + u2[k], q = u1[k] - u2[k];
                    const float r = u3[k] + u4[k], w = u3[k] - u4[k];
                    const float bk = b ? b[k] : 0.0f;
                    o[r0 * 4][k] = u0[k] + p + r + bk;
                    o[r0 * 4 + 1][k] = q + 2 * w + bk;
                    o[r0 * 4 + 2][k] = p + 4 * r + bk;
                    o[r0 * 4 + 3][k] = q + 8 * w + u5[k] + bk;
                }
                if (a->relu)
                    for (int s = 0; s < 4; s++)
                        for (long k = 0; k < kb; k++)
                            o[r0 * 4 + s][k] = o[r0 * 4 + s][k] > 0.0f ? o[r0 * 4 + s][k] : 0.0f;
            }
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
