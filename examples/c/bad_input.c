/* The C ABI on bad input: null pointers, wrong sizes, out-of-range codes and values each
 * return their status code with a message naming the argument; nothing crashes, and a
 * failed dots_moe_layer_new leaves the handle null. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dots_moe.h"

enum { H = 8, I = 4, E = 4, K = 2 };

static float gate_w[E * H], gate_up[E * 2 * I * H], down[E * H * I], hidden[3 * H], out[3 * H];
static int failures = 0, checks = 0;

static void expect(const char *what, DotsMoeStatus got, DotsMoeStatus want, const char *needle) {
    const char *msg = dots_moe_last_error();
    checks++;
    int ok = got == want && (needle == NULL || strstr(msg, needle) != NULL);
    printf("%-40s status %d (want %d)  \"%s\"  %s\n", what, (int)got, (int)want, msg, ok ? "ok" : "WRONG");
    failures += !ok;
}

static DotsMoeLayerDesc desc(void) {
    DotsMoeLayerDesc d;
    memset(&d, 0, sizeof d);
    d.config = (DotsMoeConfig){.hidden_size = H, .moe_intermediate_size = I, .n_experts = E, .top_k = K,
                               .n_shared_experts = 0, .n_group = 1, .topk_group = 1,
                               .scoring = DOTS_MOE_SCORING_SIGMOID, .norm_topk_prob = 1,
                               .routed_scaling_factor = 1.0f};
    d.weight_dtype = DOTS_MOE_F32;
    d.precision = DOTS_MOE_PRECISION_F32;
    d.router_gate = gate_w;
    d.router_gate_len = E * H;
    d.expert_begin = 0;
    d.expert_end = E;
    d.experts_gate_up = gate_up;
    d.experts_gate_up_len = E * 2 * I * H;
    d.experts_down = down;
    d.experts_down_len = E * H * I;
    return d;
}

int main(void) {
    for (int n = 0; n < E * H; n++) gate_w[n] = (float)(n % 7) / 7.0f;
    DotsMoeLayer *layer = (DotsMoeLayer *)&failures; /* must be reset to NULL on failure */
    DotsMoeLayerDesc d;

    expect("new: null desc", dots_moe_layer_new(NULL, &layer), DOTS_MOE_ERR_NULL_POINTER, "desc");
    if (layer != NULL) { puts("handle not reset to NULL"); failures++; }
    d = desc();
    expect("new: null out", dots_moe_layer_new(&d, NULL), DOTS_MOE_ERR_NULL_POINTER, "out");
    d = desc(); d.router_gate = NULL;
    expect("new: null router_gate", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_NULL_POINTER, "router_gate");
    d = desc(); d.router_gate_len = E * H - 1;
    expect("new: short router_gate", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_SHAPE, "mlp.gate.weight");
    d = desc(); d.experts_down_len = E * H * I + 1;
    expect("new: long experts_down", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_SHAPE, "experts_down");
    d = desc(); d.config.top_k = E + 1;
    expect("new: top_k above E", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_INVALID_ARGUMENT, "num_experts_per_tok");
    d = desc(); d.weight_dtype = 7;
    expect("new: unknown dtype", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_INVALID_ARGUMENT, "weight_dtype");
    d = desc(); d.expert_end = E + 2;
    expect("new: experts beyond E", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_INVALID_ARGUMENT, "0..4");
    d = desc(); d.router_gate = (const char *)gate_w + 1;
    expect("new: misaligned router_gate", dots_moe_layer_new(&d, &layer), DOTS_MOE_ERR_INVALID_ARGUMENT, "aligned");
    if (layer != NULL) { puts("handle not NULL after failures"); failures++; }

    d = desc();
    expect("new: valid", dots_moe_layer_new(&d, &layer), DOTS_MOE_OK, "");
    if (layer == NULL) { puts("no handle"); return 1; }
    expect("forward: null layer", dots_moe_layer_forward(NULL, DOTS_MOE_F32, hidden, 3, out, 3 * H),
           DOTS_MOE_ERR_NULL_POINTER, "layer");
    expect("forward: null hidden", dots_moe_layer_forward(layer, DOTS_MOE_F32, NULL, 3, out, 3 * H),
           DOTS_MOE_ERR_NULL_POINTER, "hidden");
    expect("forward: wrong out_len", dots_moe_layer_forward(layer, DOTS_MOE_F32, hidden, 3, out, 3 * H - 1),
           DOTS_MOE_ERR_SHAPE, "out");
    expect("forward: unknown hidden dtype", dots_moe_layer_forward(layer, 9, hidden, 3, out, 3 * H),
           DOTS_MOE_ERR_INVALID_ARGUMENT, "hidden_dtype");
    hidden[5] = NAN;
    expect("forward: NaN hidden", dots_moe_layer_forward(layer, DOTS_MOE_F32, hidden, 3, out, 3 * H),
           DOTS_MOE_ERR_BAD_VALUE, "not finite");
    hidden[5] = 0.0f;
    uint32_t ids[3 * K] = {0, 1, 2, 2, 3, 0};
    float w[3 * K] = {1, 1, 1, 1, 1, 1};
    expect("forward_routed: repeated expert", dots_moe_layer_forward_routed(layer, DOTS_MOE_F32, hidden, 3, ids, w, K,
                                                                          out, 3 * H),
           DOTS_MOE_ERR_BAD_VALUE, "chosen twice");
    ids[3] = 9;
    expect("forward_routed: expert out of range", dots_moe_layer_forward_routed(layer, DOTS_MOE_F32, hidden, 3, ids,
                                                                              w, K, out, 3 * H),
           DOTS_MOE_ERR_BAD_VALUE, "out of range");
    expect("route: wrong len", dots_moe_layer_route(layer, DOTS_MOE_F32, hidden, 3, ids, w, 3 * K + 1),
           DOTS_MOE_ERR_SHAPE, "expert_ids");
    expect("forward: valid (clears the error)", dots_moe_layer_forward(layer, DOTS_MOE_F32, hidden, 3, out, 3 * H),
           DOTS_MOE_OK, NULL);
    if (dots_moe_last_error()[0] != '\0') { puts("last error not cleared"); failures++; }
    expect("free: layer", dots_moe_layer_free(layer), DOTS_MOE_OK, NULL);
    expect("free: null", dots_moe_layer_free(NULL), DOTS_MOE_OK, NULL);

    printf("bad_input.c: %d passed, %d failed\n", checks - failures, failures);
    return failures != 0;
}
