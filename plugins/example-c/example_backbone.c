/*
 * A backbone plugin written in plain C against plugins/include/sage_plugin.h: the proof that
 * integrators can write plugins in C or C++. Its own encode call is a toy "colour grid" vision
 * encoder: each patch of a g x g grid becomes the mean RGB of its pixels.
 *
 * Built with -DSAGE_EXAMPLE_WEIGHTS='"/abs/folder"', its description also carries an `engine`
 * section: a tiny random-weight backbone the engine runs in every stage (sfe, edpo, eval,
 * infer), a DINOv2 ViT in the Hugging Face layout at FOLDER/dinov2 (28-pixel input, last layer)
 * and a Qwen2 decoder at FOLDER/qwen2 (the repository's tests/fixtures/hf has both).
 *
 * Build: cc -shared -fPIC -O2 -I plugins/include plugins/example-c/example_backbone.c \
 *           -o libsage_plugin_example_c.so
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sage_plugin.h"

typedef struct SageInstance {
    char last_error[256];
    char output[4096];
} Example;

static char g_error[256];

static SageStatus example_create(const char *config_json, SageInstance **out) {
    (void)config_json;
    if (!out) {
        snprintf(g_error, sizeof g_error, "out pointer is NULL");
        return SAGE_INVALID_ARGUMENT;
    }
    Example *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(g_error, sizeof g_error, "out of memory");
        return SAGE_ERROR;
    }
    *out = e;
    return SAGE_OK;
}

static void example_destroy(SageInstance *inst) { free(inst); }

static const char *example_last_error(const SageInstance *inst) { return inst ? inst->last_error : g_error; }

static SageStatus example_describe(SageInstance *inst, const char **json_out) {
#ifdef SAGE_EXAMPLE_WEIGHTS
    int n = snprintf(inst->output, sizeof inst->output,
             "{\"name\":\"example-c\",\"vision_encoder\":{\"family\":\"colour-grid\",\"patch_dim\":3},"
             "\"image_preprocess\":{\"channels\":\"rgb\",\"scale\":\"0-1\"},\"generates\":false,"
             "\"engine\":{\"vision\":{\"family\":\"dinov2\",\"weights\":\"%s/dinov2\",\"size\":28,\"layer\":\"last\"},"
             "\"llm\":{\"family\":\"qwen2\",\"weights\":\"%s/qwen2\"}}}",
             SAGE_EXAMPLE_WEIGHTS, SAGE_EXAMPLE_WEIGHTS);
    if (n < 0 || (size_t)n >= sizeof inst->output) {
        snprintf(inst->last_error, sizeof inst->last_error, "the weights folder path is too long");
        return SAGE_ERROR;
    }
#else
    snprintf(inst->output, sizeof inst->output,
             "{\"name\":\"example-c\",\"vision_encoder\":{\"family\":\"colour-grid\",\"patch_dim\":3},"
             "\"image_preprocess\":{\"channels\":\"rgb\",\"scale\":\"0-1\"},\"generates\":false}");
#endif
    *json_out = inst->output;
    return SAGE_OK;
}

static SageStatus fail(SageInstance *inst, SageStatus s, const char *msg) {
    snprintf(inst->last_error, sizeof inst->last_error, "%s", msg);
    return s;
}

static SageStatus example_encode_image(SageInstance *inst, const SageTensorView *px, SageTensorView *out) {
    if (!px || !out || px->dtype != SAGE_DTYPE_F32 || out->dtype != SAGE_DTYPE_F32 || px->device != SAGE_DEVICE_CPU)
        return fail(inst, SAGE_INVALID_ARGUMENT, "pixels and patches must be CPU f32 views");
    if (px->ndim != 3 || px->shape[0] != 3 || out->ndim != 2 || out->shape[1] != 3)
        return fail(inst, SAGE_INVALID_ARGUMENT, "expected pixels [3, H, W] and patches [P, 3]");
    int64_t h = px->shape[1], w = px->shape[2], p = out->shape[0];
    int64_t g = (int64_t)llround(sqrt((double)p));
    if (g * g != p || g > h || g > w) return fail(inst, SAGE_INVALID_ARGUMENT, "P must be a square no larger than the image");
    const float *src = px->data;
    float *dst = out->data;
    for (int64_t gy = 0; gy < g; gy++)
        for (int64_t gx = 0; gx < g; gx++)
            for (int64_t c = 0; c < 3; c++) {
                double acc = 0;
                int64_t n = 0;
                for (int64_t y = gy * h / g; y < (gy + 1) * h / g; y++)
                    for (int64_t x = gx * w / g; x < (gx + 1) * w / g; x++, n++)
                        acc += src[c * px->strides[0] + y * px->strides[1] + x * px->strides[2]];
                dst[(gy * g + gx) * out->strides[0] + c * out->strides[1]] = (float)(acc / (double)n);
            }
    return SAGE_OK;
}

static SageStatus example_generate(SageInstance *inst, const char *prompt, const char *options, const char **out) {
    (void)prompt; (void)options; (void)out;
    return fail(inst, SAGE_UNSUPPORTED, "example-c does not generate text");
}

static const SagePluginV1 TABLE = {
    .abi_version = SAGE_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(SagePluginV1),
    .kind = SAGE_KIND_BACKBONE,
    .name = "example-c",
    .version = "0.1.0",
    .description = "example backbone written in C: mean colour of each cell of a square grid",
    .init = NULL,
    .create = example_create,
    .destroy = example_destroy,
    .last_error = example_last_error,
    .backbone_describe = example_describe,
    .backbone_encode_image = example_encode_image,
    .backbone_generate = example_generate,
};

const SagePluginV1 *sage_plugin_entry(const SageHostV1 *host) {
    (void)host;
    return &TABLE;
}
