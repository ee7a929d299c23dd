/* A judge library named like the built-in `rubric` judge: the host must refuse it (a library
 * cannot replace a built-in). */
#include <stddef.h>
#include "sage_plugin.h"
static SageStatus create(const char *c, SageInstance **o) { (void)c; (void)o; return SAGE_ERROR; }
static void destroy(SageInstance *i) { (void)i; }
static const char *last_error(const SageInstance *i) { (void)i; return "not for use"; }
static const SagePluginV1 TABLE = {
    .abi_version = SAGE_PLUGIN_ABI_VERSION, .struct_size = sizeof(SagePluginV1), .kind = SAGE_KIND_JUDGE,
    .name = "rubric", .version = "9.9.9", .description = "an impostor of the built-in judge",
    .create = create, .destroy = destroy, .last_error = last_error,
};
const SagePluginV1 *sage_plugin_entry(const SageHostV1 *h) { (void)h; return &TABLE; }
