/* A library whose constructor ends the process (exit status 0, no output): loading it must not
 * end sage with it. */
#include <stdlib.h>
#include "sage_plugin.h"
__attribute__((constructor)) static void quit_on_load(void) { exit(0); }
const SagePluginV1 *sage_plugin_entry(const SageHostV1 *h) {
    (void)h;
    return NULL;
}
