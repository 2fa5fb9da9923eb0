#include "hostcfg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static const char *const known_keys[] = {
    "endpoints", "ca_file", "cert_file", "key_file", "token", "max_frame_bytes", "reconnect_min_ms",
    "reconnect_max_ms", "reconnect_stable_ms", "handshake_timeout_ms", "outbox_bytes", "hello", "log_level", NULL};

static int known(const char *key) {
  for (const char *const *k = known_keys; *k; k++)
    if (strcmp(*k, key) == 0) return 1;
  return 0;
}

static char *dup_string(json_t *obj, const char *key, int required, char *err, size_t errlen, int *bad) {
  json_t *v = json_object_get(obj, key);
  if (!v || json_is_null(v)) {
    if (required) {
      snprintf(err, errlen, "'%s' is required", key);
      *bad = 1;
    }
    return NULL;
  }
  if (!json_is_string(v)) {
    snprintf(err, errlen, "'%s' must be a string", key);
    *bad = 1;
    return NULL;
  }
  return strdup(json_string_value(v));
}

static int get_uint(json_t *obj, const char *key, uint64_t lo, uint64_t hi, uint64_t dflt, uint64_t *out, char *err,
                    size_t errlen) {
  json_t *v = json_object_get(obj, key);
  if (!v || json_is_null(v)) {
    *out = dflt;
    return 0;
  }
  if (!json_is_integer(v) || json_integer_value(v) < (json_int_t)lo || json_integer_value(v) > (json_int_t)hi) {
    snprintf(err, errlen, "'%s' must be an integer from %llu to %llu", key, (unsigned long long)lo,
             (unsigned long long)hi);
    return -1;
  }
  *out = (uint64_t)json_integer_value(v);
  return 0;
}

int pa_host_cfg_parse(pa_host_cfg_t *cfg, const char *json, size_t len, char *err, size_t errlen) {
  memset(cfg, 0, sizeof *cfg);
  cfg->log_level = PA_LOG_INFO;
  json_error_t jerr;
  json_t *root = json_loadb(json, len, 0, &jerr);
  if (!root) {
    snprintf(err, errlen, "host config is not valid JSON: %s", jerr.text);
    return -1;
  }
  int bad = 0;
  if (!json_is_object(root)) {
    snprintf(err, errlen, "host config must be a JSON object");
    goto fail;
  }
  const char *key;
  json_t *val;
  json_object_foreach(root, key, val) {
    if (!known(key)) {
      snprintf(err, errlen, "unknown host config key '%s'", key);
      goto fail;
    }
  }
  json_t *eps = json_object_get(root, "endpoints");
  if (!json_is_array(eps) || json_array_size(eps) == 0 || json_array_size(eps) > 16) {
    snprintf(err, errlen, "'endpoints' must be a list of 1 to 16 endpoints");
    goto fail;
  }
  cfg->n_endpoints = json_array_size(eps);
  cfg->endpoints = calloc(cfg->n_endpoints, sizeof *cfg->endpoints);
  if (!cfg->endpoints) goto oom;
  size_t i;
  json_array_foreach(eps, i, val) {
    pa_endpoint_cfg_t *ep = &cfg->endpoints[i];
    json_t *port = json_object_get(val, "port");
    if (!json_is_object(val) || !json_is_integer(port) || json_integer_value(port) < 1 ||
        json_integer_value(port) > 65535) {
      snprintf(err, errlen, "endpoints[%zu] needs 'host' and a 'port' from 1 to 65535", i);
      goto fail;
    }
    const char *ekey;
    json_t *eval;
    json_object_foreach(val, ekey, eval) {
      if (strcmp(ekey, "host") && strcmp(ekey, "port") && strcmp(ekey, "server_name")) {
        snprintf(err, errlen, "unknown host config key 'endpoints[%zu].%s'", i, ekey);
        goto fail;
      }
    }
    ep->port = (int)json_integer_value(port);
    ep->host = dup_string(val, "host", 1, err, errlen, &bad);
    if (bad) goto fail;
    ep->server_name = dup_string(val, "server_name", 0, err, errlen, &bad);
    if (bad) goto fail;
    if (!ep->server_name || !ep->server_name[0]) {
      free(ep->server_name);
      ep->server_name = strdup(ep->host);
    }
    if (!ep->host || !ep->server_name) goto oom;
  }
  cfg->ca_file = dup_string(root, "ca_file", 1, err, errlen, &bad);
  if (bad) goto fail;
  cfg->cert_file = dup_string(root, "cert_file", 0, err, errlen, &bad);
  if (bad) goto fail;
  cfg->key_file = dup_string(root, "key_file", 0, err, errlen, &bad);
  if (bad) goto fail;
  cfg->token = dup_string(root, "token", 0, err, errlen, &bad);
  if (bad) goto fail;
  uint64_t u;
  if (get_uint(root, "max_frame_bytes", 1024, 1u << 30, 1u << 20, &u, err, errlen)) goto fail;
  cfg->max_frame_bytes = (size_t)u;
  if (get_uint(root, "reconnect_min_ms", 1, 3600000, 500, &cfg->reconnect_min_ms, err, errlen)) goto fail;
  if (get_uint(root, "reconnect_max_ms", 1, 86400000, 60000, &cfg->reconnect_max_ms, err, errlen)) goto fail;
  if (get_uint(root, "reconnect_stable_ms", 0, 86400000, 30000, &cfg->reconnect_stable_ms, err, errlen)) goto fail;
  if (get_uint(root, "handshake_timeout_ms", 100, 600000, 10000, &cfg->handshake_timeout_ms, err, errlen)) goto fail;
  if (get_uint(root, "outbox_bytes", 0, 1u << 30, 16u << 20, &u, err, errlen)) goto fail;
  cfg->outbox_bytes = (size_t)u;
  json_t *hello = json_object_get(root, "hello");
  if (!json_is_object(hello)) {
    snprintf(err, errlen, "'hello' must be an object (the handshake.hello params)");
    goto fail;
  }
  cfg->hello = json_deep_copy(hello);
  if (!cfg->hello) goto oom;
  json_t *lvl = json_object_get(root, "log_level");
  if (lvl && !json_is_null(lvl)) {
    int level = json_is_string(lvl) ? pa_log_level_from_name(json_string_value(lvl)) : -1;
    if (level < 0) {
      snprintf(err, errlen, "'log_level' must be one of debug, info, warning, error");
      goto fail;
    }
    cfg->log_level = level;
  }
  json_decref(root);
  return 0;

oom:
  snprintf(err, errlen, "out of memory");
fail:
  json_decref(root);
  pa_host_cfg_free(cfg);
  return -1;
}

void pa_host_cfg_free(pa_host_cfg_t *cfg) {
  for (size_t i = 0; cfg->endpoints && i < cfg->n_endpoints; i++) {
    free(cfg->endpoints[i].host);
    free(cfg->endpoints[i].server_name);
  }
  free(cfg->endpoints);
  free(cfg->ca_file);
  free(cfg->cert_file);
  free(cfg->key_file);
  free(cfg->token);
  if (cfg->hello) json_decref(cfg->hello);
  memset(cfg, 0, sizeof *cfg);
}
