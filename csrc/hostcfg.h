/* The host's configuration: a JSON document built and validated by the Python runtime from the agent's TOML file
 * (docs/architecture.md), checked again here because C must never trust its input. */
#ifndef PA_HOSTCFG_H
#define PA_HOSTCFG_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

typedef struct pa_endpoint_cfg_s {
  char *host;
  int port;
  char *server_name; /* the name checked on the endpoint's certificate */
} pa_endpoint_cfg_t;

typedef struct pa_host_cfg_s {
  pa_endpoint_cfg_t *endpoints;
  size_t n_endpoints;
  char *ca_file;
  char *cert_file; /* optional: client certificate (mutual TLS) */
  char *key_file;
  char *token;     /* optional: shared agent token, added to the hello */
  size_t max_frame_bytes;
  uint64_t reconnect_min_ms;
  uint64_t reconnect_max_ms;
  uint64_t reconnect_stable_ms;
  uint64_t handshake_timeout_ms; /* connect + TLS + hello */
  size_t outbox_bytes;           /* lines for "any session" held while none is up */
  json_t *hello;                 /* hello params from the runtime (owned) */
  int log_level;
} pa_host_cfg_t;

/* 0, or -1 with `err` naming the key that is wrong. */
int pa_host_cfg_parse(pa_host_cfg_t *cfg, const char *json, size_t len, char *err, size_t errlen);
void pa_host_cfg_free(pa_host_cfg_t *cfg);

#endif
