/* pin.h: where maps are pinned, so enforcement state outlives the daemon and a restart re-adopts
 * it. The directory comes from the loader as -DSG_PIN_DIR="..." (config.PIN_DIR); bcc creates a
 * map on first load and re-opens the pinned one afterwards. Not for programs: the loader pins
 * those itself after loading.
 */
#ifndef SG_PIN_H
#define SG_PIN_H
#ifndef SG_PIN_DIR
#error "SG_PIN_DIR must be given by the loader (-DSG_PIN_DIR=\"/sys/fs/bpf/skyguard\")"
#endif
#define SG_PIN(name) SG_PIN_DIR "/" name
#endif
