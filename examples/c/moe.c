/* Builds a small dots-moe layer through the C ABI, runs it, and checks the output
 * against a plain C computation of the same layer (router with bias, top-k,
 * normalisation and scaling, SwiGLU experts, shared experts). Then splits the layer
 * into two expert-parallel parts and checks that their partial outputs sum to it.
 *
 * Build: see scripts/c/run.sh (cc -Iinclude examples/c/moe.c libdots_moe_c.a ...). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dots_moe.h"

enum { H = 16, I = 8, E = 6, K = 2, S = 2, T = 5 };

static float pattern(int n, int seed) {
    unsigned x = (unsigned)n * 2654435761u + (unsigned)seed * 40503u;
    return (float)((x >> 8) % 2001) / 1000.0f - 1.0f;
}

static float gate_w[E * H], bias[E];
static float gate_up[E * 2 * I * H], down[E * H * I];
static float sh_gate[S * I * H], sh_up[S * I * H], sh_down[H * S * I];
static float hidden[T * H];

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static float silu(float x) { return x / (1.0f + expf(-x)); }

/* One SwiGLU MLP of width `w`: gate rows g[w][H], up rows u[w][H], down d[H][ld] cols c0.. */
static void mlp(const float *x, const float *g, const float *u, const float *d, int w, int ld, int c0,
                float scale, float *out) {
    float act[S * I];
    for (int n = 0; n < w; n++) {
        float a = 0, b = 0;
        for (int h = 0; h < H; h++) {
            a += g[n * H + h] * x[h];
            b += u[n * H + h] * x[h];
        }
        act[n] = silu(a) * b;
    }
    for (int h = 0; h < H; h++) {
        float y = 0;
        for (int n = 0; n < w; n++) y += d[h * ld + c0 + n] * act[n];
        out[h] += scale * y;
    }
}

/* The whole layer, computed here. */
static void reference(float *out) {
    memset(out, 0, sizeof(float) * T * H);
    for (int t = 0; t < T; t++) {
        const float *x = &hidden[t * H];
        float score[E], choice[E];
        for (int e = 0; e < E; e++) {
            float l = 0;
            for (int h = 0; h < H; h++) l += gate_w[e * H + h] * x[h];
            score[e] = sigmoidf(l);
            choice[e] = score[e] + bias[e];
        }
        int ids[K];
        float w[K], sum = 0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int p = 0; p < j; p++) taken |= ids[p] == e;
                if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
            }
            ids[j] = best;
            w[j] = score[best];
            sum += w[j];
        }
        for (int j = 0; j < K; j++) {
            int e = ids[j];
            mlp(x, &gate_up[e * 2 * I * H], &gate_up[e * 2 * I * H + I * H], &down[e * H * I], I, I, 0,
                w[j] / (sum + 1e-20f) * 2.5f, &out[t * H]);
        }
        mlp(x, sh_gate, sh_up, sh_down, S * I, S * I, 0, 1.0f, &out[t * H]);
    }
}

static DotsMoeLayer *build(size_t begin, size_t end, uint32_t shared) {
    DotsMoeLayerDesc d;
    memset(&d, 0, sizeof d);
    d.config = (DotsMoeConfig){.hidden_size = H, .moe_intermediate_size = I, .n_experts = E, .top_k = K,
                               .n_shared_experts = S, .n_group = 1, .topk_group = 1,
                               .scoring = DOTS_MOE_SCORING_SIGMOID, .norm_topk_prob = 1,
                               .routed_scaling_factor = 2.5f};
    d.weight_dtype = DOTS_MOE_F32;
    d.precision = DOTS_MOE_PRECISION_F32;
    d.router_gate = gate_w;
    d.router_gate_len = E * H;
    d.router_bias = bias;
    d.router_bias_len = E;
    d.expert_begin = begin;
    d.expert_end = end;
    d.experts_gate_up = &gate_up[begin * 2 * I * H];
    d.experts_gate_up_len = (end - begin) * 2 * I * H;
    d.experts_down = &down[begin * H * I];
    d.experts_down_len = (end - begin) * H * I;
    d.shared_experts = shared;
    d.shared_gate = sh_gate;
    d.shared_gate_len = S * I * H;
    d.shared_up = sh_up;
    d.shared_up_len = S * I * H;
    d.shared_down = sh_down;
    d.shared_down_len = H * S * I;
    DotsMoeLayer *layer = NULL;
    DotsMoeStatus st = dots_moe_layer_new(&d, &layer);
    if (st != DOTS_MOE_OK) {
        fprintf(stderr, "dots_moe_layer_new: %d: %s\n", (int)st, dots_moe_last_error());
        exit(1);
    }
    return layer;
}

static int check(const char *what, const float *got, const float *want) {
    float err = 0, norm = 0;
    for (int n = 0; n < T * H; n++) {
        err += (got[n] - want[n]) * (got[n] - want[n]);
        norm += want[n] * want[n];
    }
    float rel = sqrtf(err / norm);
    printf("%-28s relative error %.3g\n", what, rel);
    return rel <= 1e-5f && norm > 0;
}

int main(void) {
    for (int n = 0; n < E * H; n++) gate_w[n] = pattern(n, 1);
    for (int e = 0; e < E; e++) bias[e] = 0.01f * (float)(e % 3);
    for (int n = 0; n < E * 2 * I * H; n++) gate_up[n] = 0.3f * pattern(n, 2);
    for (int n = 0; n < E * H * I; n++) down[n] = 0.3f * pattern(n, 3);
    for (int n = 0; n < S * I * H; n++) sh_gate[n] = 0.3f * pattern(n, 4), sh_up[n] = 0.3f * pattern(n, 5);
    for (int n = 0; n < H * S * I; n++) sh_down[n] = 0.3f * pattern(n, 6);
    for (int n = 0; n < T * H; n++) hidden[n] = pattern(n, 7);

    float want[T * H], got[T * H], part_a[T * H], part_b[T * H];
    reference(want);

    DotsMoeLayer *layer = build(0, E, 1);
    if (dots_moe_layer_forward(layer, DOTS_MOE_F32, hidden, T, got, T * H) != DOTS_MOE_OK) {
        fprintf(stderr, "forward: %s\n", dots_moe_last_error());
        return 1;
    }
    int ok = check("whole layer vs C reference", got, want);

    uint32_t ids[T * K];
    float weights[T * K];
    if (dots_moe_layer_route(layer, DOTS_MOE_F32, hidden, T, ids, weights, T * K) != DOTS_MOE_OK) return 1;
    for (int t = 0; t < T; t++) printf("token %d: experts %u %u, weights %.4f %.4f\n", t, ids[t * K], ids[t * K + 1],
                                       weights[t * K], weights[t * K + 1]);

    /* Expert parallelism: experts 0..2 plus the shared experts, and experts 2..E. */
    DotsMoeLayer *a = build(0, 2, 1), *b = build(2, E, 0);
    if (dots_moe_layer_forward(a, DOTS_MOE_F32, hidden, T, part_a, T * H) != DOTS_MOE_OK ||
        dots_moe_layer_forward_routed(b, DOTS_MOE_F32, hidden, T, ids, weights, K, part_b, T * H) != DOTS_MOE_OK) {
        fprintf(stderr, "partial forward: %s\n", dots_moe_last_error());
        return 1;
    }
    for (int n = 0; n < T * H; n++) part_a[n] += part_b[n];
    ok &= check("sum of two shards vs C", part_a, want);

    dots_moe_layer_free(layer);
    dots_moe_layer_free(a);
    dots_moe_layer_free(b);
    puts(ok ? "moe.c: OK" : "moe.c: FAILED");
    return ok ? 0 : 1;
}
