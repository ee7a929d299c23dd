/* A plugin whose entry point aborts: probing it must cost the probe process, not sage. */
#include <stdlib.h>
#include "sage_plugin.h"
const SagePluginV1 *sage_plugin_entry(const SageHostV1 *h) {
    (void)h;
    abort();
}
