/* libFuzzer target: pa_host_cfg_parse (the host config JSON from the runtime; C re-checks it) accepts or refuses any
 * bytes without a memory error; an accepted config satisfies the documented bounds; a refusal names the problem. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hostcfg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *doc = malloc(size ? size : 1);
  if (!doc) abort();
  memcpy(doc, data, size);
  pa_host_cfg_t cfg;
  char err[256];
  err[0] = '\0';
  int rc = pa_host_cfg_parse(&cfg, doc, size, err, sizeof err);
  free(doc);
  if (rc == 0) {
    if (cfg.n_endpoints < 1 || cfg.n_endpoints > 16 || !cfg.endpoints || !cfg.ca_file) abort();
    for (size_t i = 0; i < cfg.n_endpoints; i++) {
      if (!cfg.endpoints[i].host || !cfg.endpoints[i].server_name) abort();
      if (cfg.endpoints[i].port < 1 || cfg.endpoints[i].port > 65535) abort();
    }
    if (cfg.max_frame_bytes < 1024 || cfg.max_frame_bytes > (1u << 30) || !cfg.hello) abort();
    if (cfg.reconnect_min_ms < 1 || cfg.handshake_timeout_ms < 100 || cfg.handshake_timeout_ms > 600000) abort();
  } else if (err[0] == '\0' || !memchr(err, '\0', sizeof err)) {
    abort();
  }
  pa_host_cfg_free(&cfg);
  return 0;
}
