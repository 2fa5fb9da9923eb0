/* The host config (hostcfg.h): defaults for what is left out, and an error naming the key for anything wrong. */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hostcfg.h"
#include "log.h"
#include "task.h"

/* The smallest valid config: one endpoint, the pinned CA, the hello params. */
static json_t *minimal_cfg(void) {
  json_t *doc = json_pack("{s:[{s:s, s:i}], s:s, s:{s:s}}", "endpoints", "host", "ep.example.net", "port", 7443,
                          "ca_file", "/etc/pyagent/ca.pem", "hello", "agent_id", "a-1");
  ASSERT_NOT_NULL(doc);
  return doc;
}

/* Parse `doc` (consumed). */
static int parse_doc(json_t *doc, pa_host_cfg_t *cfg, char *err, size_t errlen) {
  char *s = json_dumps(doc, JSON_COMPACT);
  ASSERT_NOT_NULL(s);
  json_decref(doc);
  err[0] = '\0';
  int rc = pa_host_cfg_parse(cfg, s, strlen(s), err, errlen);
  free(s);
  return rc;
}

/* `doc` (consumed) is refused with an error that contains `needle`, and leaves nothing allocated. */
static void expect_error(json_t *doc, const char *needle) {
  pa_host_cfg_t cfg;
  char err[300];
  ASSERT_EQ(parse_doc(doc, &cfg, err, sizeof err), -1);
  ASSERT_STR_CONTAINS(err, needle);
  ASSERT_NULL(cfg.endpoints);
  ASSERT_NULL(cfg.ca_file);
  ASSERT_NULL(cfg.hello);
  pa_host_cfg_free(&cfg); /* already freed by the parser; freeing again is harmless */
}

/* The minimal config with `key` set to `value` (stolen); a NULL value deletes the key. */
static json_t *with(const char *key, json_t *value) {
  json_t *doc = minimal_cfg();
  if (value) json_object_set_new(doc, key, value);
  else json_object_del(doc, key);
  return doc;
}

/* The minimal config with its endpoint's `key` set to `value` (stolen); NULL deletes it. */
static json_t *with_endpoint(const char *key, json_t *value) {
  json_t *doc = minimal_cfg();
  json_t *ep = json_array_get(json_object_get(doc, "endpoints"), 0);
  if (value) json_object_set_new(ep, key, value);
  else json_object_del(ep, key);
  return doc;
}

TEST_IMPL(hostcfg_minimal_defaults) {
  pa_host_cfg_t cfg;
  char err[300];
  ASSERT_OK(parse_doc(minimal_cfg(), &cfg, err, sizeof err));
  ASSERT_UINT64_EQ(cfg.n_endpoints, 1);
  ASSERT_STR_EQ(cfg.endpoints[0].host, "ep.example.net");
  ASSERT_EQ(cfg.endpoints[0].port, 7443);
  ASSERT_STR_EQ(cfg.endpoints[0].server_name, "ep.example.net"); /* defaults to the host */
  ASSERT_STR_EQ(cfg.ca_file, "/etc/pyagent/ca.pem");
  ASSERT_NULL(cfg.cert_file);
  ASSERT_NULL(cfg.key_file);
  ASSERT_NULL(cfg.token);
  ASSERT_UINT64_EQ(cfg.max_frame_bytes, 1048576); /* docs/protocol.md: 1 MiB */
  ASSERT_UINT64_EQ(cfg.reconnect_min_ms, 500);
  ASSERT_UINT64_EQ(cfg.reconnect_max_ms, 60000);
  ASSERT_UINT64_EQ(cfg.reconnect_stable_ms, 30000);
  ASSERT_UINT64_EQ(cfg.handshake_timeout_ms, 10000);
  ASSERT_UINT64_EQ(cfg.outbox_bytes, 16u << 20);
  ASSERT_EQ(cfg.log_level, PA_LOG_INFO);
  ASSERT(json_is_object(cfg.hello));
  ASSERT_STR_EQ(json_string_value(json_object_get(cfg.hello, "agent_id")), "a-1");
  pa_host_cfg_free(&cfg);
  ASSERT_NULL(cfg.endpoints);

  /* Explicit nulls mean "use the default" too, and an empty server_name falls back to the host. */
  json_t *doc = with("token", json_null());
  json_object_set_new(doc, "max_frame_bytes", json_null());
  json_object_set_new(json_array_get(json_object_get(doc, "endpoints"), 0), "server_name", json_string(""));
  ASSERT_OK(parse_doc(doc, &cfg, err, sizeof err));
  ASSERT_NULL(cfg.token);
  ASSERT_UINT64_EQ(cfg.max_frame_bytes, 1048576);
  ASSERT_STR_EQ(cfg.endpoints[0].server_name, "ep.example.net");
  pa_host_cfg_free(&cfg);
  return 0;
}

TEST_IMPL(hostcfg_full) {
  static const char doc[] =
      "{\"endpoints\":[{\"host\":\"10.0.0.5\",\"port\":7443,\"server_name\":\"ep.internal\"},"
      "{\"host\":\"backup.example.net\",\"port\":443}],"
      "\"ca_file\":\"/etc/pyagent/ca.pem\",\"cert_file\":\"/etc/pyagent/agent.pem\","
      "\"key_file\":\"/etc/pyagent/agent.key\",\"token\":\"s3cret\",\"max_frame_bytes\":65536,"
      "\"reconnect_min_ms\":100,\"reconnect_max_ms\":5000,\"reconnect_stable_ms\":0,\"handshake_timeout_ms\":2000,"
      "\"outbox_bytes\":0,\"hello\":{\"agent_id\":\"a-2\",\"labels\":{\"site\":\"lab\"}},\"log_level\":\"DEBUG\"}";
  pa_host_cfg_t cfg;
  char err[300] = "";
  if (pa_host_cfg_parse(&cfg, doc, sizeof doc - 1, err, sizeof err)) ASSERT_FAILED("refused: %s", err);
  ASSERT_UINT64_EQ(cfg.n_endpoints, 2);
  ASSERT_STR_EQ(cfg.endpoints[0].host, "10.0.0.5");
  ASSERT_STR_EQ(cfg.endpoints[0].server_name, "ep.internal");
  ASSERT_STR_EQ(cfg.endpoints[1].host, "backup.example.net");
  ASSERT_EQ(cfg.endpoints[1].port, 443);
  ASSERT_STR_EQ(cfg.endpoints[1].server_name, "backup.example.net");
  ASSERT_STR_EQ(cfg.cert_file, "/etc/pyagent/agent.pem");
  ASSERT_STR_EQ(cfg.key_file, "/etc/pyagent/agent.key");
  ASSERT_STR_EQ(cfg.token, "s3cret");
  ASSERT_UINT64_EQ(cfg.max_frame_bytes, 65536);
  ASSERT_UINT64_EQ(cfg.reconnect_min_ms, 100);
  ASSERT_UINT64_EQ(cfg.reconnect_max_ms, 5000);
  ASSERT_UINT64_EQ(cfg.reconnect_stable_ms, 0);
  ASSERT_UINT64_EQ(cfg.handshake_timeout_ms, 2000);
  ASSERT_UINT64_EQ(cfg.outbox_bytes, 0);
  ASSERT_EQ(cfg.log_level, PA_LOG_DEBUG);
  ASSERT_STR_EQ(json_string_value(json_object_get(json_object_get(cfg.hello, "labels"), "site")), "lab");
  pa_host_cfg_free(&cfg);
  return 0;
}

TEST_IMPL(hostcfg_unknown_key) {
  expect_error(with("ca", json_string("/etc/pyagent/ca.pem")), "'ca'");
  expect_error(with("heartbeat_interval", json_integer(5)), "'heartbeat_interval'");
  return 0;
}

TEST_IMPL(hostcfg_unknown_endpoint_key) {
  /* Unknown keys are an error that names the key (STYLE.md, Fluent Bit's config maps), at every level: a misspelt
   * server_name silently falls back to checking the certificate against the host instead. */
  expect_error(with_endpoint("sever_name", json_string("ep.internal")), "sever_name");
  return 0;
}

TEST_IMPL(hostcfg_endpoints_invalid) {
  expect_error(with("endpoints", NULL), "'endpoints'");
  expect_error(with("endpoints", json_array()), "'endpoints'");
  expect_error(with("endpoints", json_string("ep.example.net:7443")), "'endpoints'");
  json_t *many = json_array();
  for (int i = 0; i < 17; i++) json_array_append_new(many, json_pack("{s:s, s:i}", "host", "h", "port", 1));
  expect_error(with("endpoints", many), "'endpoints'");
  /* Each endpoint needs a host string. */
  expect_error(with_endpoint("host", NULL), "'host'");
  expect_error(with_endpoint("host", json_integer(1)), "'host'");
  expect_error(with_endpoint("server_name", json_integer(1)), "'server_name'");
  expect_error(with("endpoints", json_pack("[s]", "ep.example.net")), "endpoints[0]");
  return 0;
}

TEST_IMPL(hostcfg_bad_port) {
  expect_error(with_endpoint("port", NULL), "'port'");
  expect_error(with_endpoint("port", json_integer(0)), "'port'");
  expect_error(with_endpoint("port", json_integer(65536)), "'port'");
  expect_error(with_endpoint("port", json_string("7443")), "'port'");
  expect_error(with_endpoint("port", json_real(7443.5)), "'port'");
  /* Which endpoint is wrong is named too. */
  json_t *doc = minimal_cfg();
  json_array_append_new(json_object_get(doc, "endpoints"), json_pack("{s:s, s:i}", "host", "b", "port", -1));
  expect_error(doc, "endpoints[1]");
  /* The bounds themselves are fine. */
  pa_host_cfg_t cfg;
  char err[300];
  ASSERT_OK(parse_doc(with_endpoint("port", json_integer(65535)), &cfg, err, sizeof err));
  ASSERT_EQ(cfg.endpoints[0].port, 65535);
  pa_host_cfg_free(&cfg);
  ASSERT_OK(parse_doc(with_endpoint("port", json_integer(1)), &cfg, err, sizeof err));
  pa_host_cfg_free(&cfg);
  return 0;
}

TEST_IMPL(hostcfg_ca_file_invalid) {
  expect_error(with("ca_file", NULL), "'ca_file'");
  expect_error(with("ca_file", json_null()), "'ca_file'");
  expect_error(with("ca_file", json_integer(5)), "'ca_file'");
  expect_error(with("cert_file", json_true()), "'cert_file'");
  expect_error(with("key_file", json_array()), "'key_file'");
  expect_error(with("token", json_integer(5)), "'token'");
  return 0;
}

TEST_IMPL(hostcfg_bad_log_level) {
  expect_error(with("log_level", json_string("verbose")), "'log_level'");
  expect_error(with("log_level", json_integer(10)), "'log_level'");
  expect_error(with("log_level", json_string("")), "'log_level'");
  static const struct {
    const char *name;
    int level;
  } ok[] = {{"debug", PA_LOG_DEBUG}, {"info", PA_LOG_INFO}, {"warning", PA_LOG_WARNING}, {"warn", PA_LOG_WARNING},
            {"error", PA_LOG_ERROR}};
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    pa_host_cfg_t cfg;
    char err[300];
    ASSERT_OK(parse_doc(with("log_level", json_string(ok[i].name)), &cfg, err, sizeof err));
    ASSERT_EQ(cfg.log_level, ok[i].level);
    pa_host_cfg_free(&cfg);
  }
  return 0;
}

TEST_IMPL(hostcfg_bad_number) {
  expect_error(with("max_frame_bytes", json_integer(1023)), "'max_frame_bytes'");
  expect_error(with("max_frame_bytes", json_integer((json_int_t)1 << 31)), "'max_frame_bytes'");
  expect_error(with("max_frame_bytes", json_string("1MiB")), "'max_frame_bytes'");
  expect_error(with("reconnect_min_ms", json_integer(0)), "'reconnect_min_ms'");
  expect_error(with("reconnect_max_ms", json_integer(-1)), "'reconnect_max_ms'");
  expect_error(with("reconnect_stable_ms", json_real(1.5)), "'reconnect_stable_ms'");
  expect_error(with("handshake_timeout_ms", json_integer(99)), "'handshake_timeout_ms'");
  expect_error(with("outbox_bytes", json_integer(-5)), "'outbox_bytes'");
  return 0;
}

TEST_IMPL(hostcfg_hello_invalid) {
  expect_error(with("hello", NULL), "'hello'");
  expect_error(with("hello", json_array()), "'hello'");
  expect_error(with("hello", json_null()), "'hello'");
  return 0;
}

TEST_IMPL(hostcfg_not_json) {
  pa_host_cfg_t cfg;
  char err[300];
  ASSERT_EQ(pa_host_cfg_parse(&cfg, "{\"endpoints\":", 13, err, sizeof err), -1);
  ASSERT_STR_CONTAINS(err, "not valid JSON");
  ASSERT_NULL(cfg.endpoints);
  ASSERT_EQ(pa_host_cfg_parse(&cfg, "[]", 2, err, sizeof err), -1);
  ASSERT_STR_CONTAINS(err, "JSON object");
  ASSERT_NULL(cfg.endpoints);
  return 0;
}
