/* A library whose `sage_plugin_entry` symbol is data, not a function: calling it faults. */
const unsigned char sage_plugin_entry[16] = {0};
