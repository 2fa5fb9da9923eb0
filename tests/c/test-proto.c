/* Protocol v1 envelope checks and builders (proto.h, docs/protocol.md "Messages" and "Error codes"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "proto.h"
#include "task.h"

static int parse_str(pa_msg_t *m, const char *line, char *why, size_t whylen) {
  why[0] = '\0';
  return pa_msg_parse(m, line, strlen(line), why, whylen);
}

/* A refused frame: the code, a reason that names `needle`, and nothing left to free. */
static void expect_refused(const char *line, int code, const char *needle) {
  pa_msg_t m;
  char why[300];
  int rc = parse_str(&m, line, why, sizeof why);
  if (rc != code) ASSERT_FAILED("frame %s: code %d, expected %d (why: %s)", line, rc, code, why);
  ASSERT_STR_CONTAINS(why, needle);
  ASSERT_NULL(m.root);
}

TEST_IMPL(proto_parse_request) {
  pa_msg_t m;
  char why[300];
  ASSERT_OK(parse_str(&m,
                      "{\"v\":\"1\",\"id\":7,\"source\":\"endpoint\",\"target\":\"a1\",\"method\":\"bundle.call\","
                      "\"params\":{\"agent\":\"hello\",\"method\":\"greet\",\"params\":{\"name\":\"world\"}}}",
                      why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_REQUEST);
  ASSERT_EQ(m.id, 7);
  ASSERT_STR_EQ(m.method, "bundle.call");
  ASSERT(json_is_object(m.params));
  ASSERT_STR_EQ(json_string_value(json_object_get(m.params, "agent")), "hello");
  ASSERT_NULL(m.result);
  ASSERT_NULL(m.error);
  pa_msg_free(&m);
  ASSERT_NULL(m.root);

  /* params may be omitted; the host's own ids are negative. */
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":-3,\"method\":\"heartbeat.post\"}", why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_REQUEST);
  ASSERT_EQ(m.id, -3);
  ASSERT_NULL(m.params);
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_parse_notification) {
  pa_msg_t m;
  char why[300];
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"method\":\"heartbeat.post\",\"params\":{\"seq\":1}}", why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_NOTIFICATION);
  ASSERT_STR_EQ(m.method, "heartbeat.post");
  ASSERT_EQ(m.id, 0);
  ASSERT(json_is_object(m.params));
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_parse_response) {
  pa_msg_t m;
  char why[300];
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":12,\"result\":{\"timestamp\":1700000000000}}", why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT_EQ(m.id, 12);
  ASSERT_NULL(m.method);
  ASSERT(json_is_object(m.result));
  ASSERT_NULL(m.error);
  pa_msg_free(&m);

  /* A null result is still a result. */
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":1,\"result\":null}", why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT(json_is_null(m.result));
  pa_msg_free(&m);

  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":-1,\"error\":{\"code\":-32000,\"message\":\"bad token\"}}", why,
                      sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT_EQ(m.id, -1);
  ASSERT_NULL(m.result);
  ASSERT(json_is_object(m.error));
  ASSERT_EQ((int64_t)json_number_value(json_object_get(m.error, "code")), PA_ERR_UNAUTHORIZED);
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_invalid_json) {
  static const char *const bad[] = {"{", "{\"v\":\"1\",\"id\":1,x}", "not json", "{\"v\":\"1\"} trailing",
                                    "{\"v\":\"1\",\"id\":1,\"result\":tru}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    pa_msg_t m;
    char why[300];
    ASSERT_EQ(parse_str(&m, bad[i], why, sizeof why), PA_ERR_PARSE);
    ASSERT_NULL(m.root);
    /* The reason names the byte offset jansson stopped at. */
    json_error_t jerr;
    ASSERT_NULL(json_loadb(bad[i], strlen(bad[i]), JSON_DECODE_INT_AS_REAL, &jerr));
    char at[64];
    snprintf(at, sizeof at, "at byte %d", jerr.position);
    ASSERT_STR_CONTAINS(why, "invalid JSON");
    ASSERT_STR_CONTAINS(why, at);
  }
  /* The position is where the damage is (the stray x is byte 16; jansson counts through the token it choked on). */
  pa_msg_t m;
  char why[300];
  ASSERT_EQ(parse_str(&m, "{\"v\":\"1\",\"id\":1,x}", why, sizeof why), PA_ERR_PARSE);
  const char *at = strstr(why, "at byte ");
  ASSERT_NOT_NULL(at);
  long pos = strtol(at + 8, NULL, 10);
  ASSERT_GE(pos, 16);
  ASSERT_LE(pos, 17);
  /* An empty frame (the framer never delivers one, but the parser must not accept it). */
  ASSERT_EQ(pa_msg_parse(&m, "", 0, why, sizeof why), PA_ERR_PARSE);
  ASSERT_NULL(m.root);
  return 0;
}

TEST_IMPL(proto_not_object) {
  expect_refused("[1,2,3]", PA_ERR_INVALID_REQUEST, "object");
  expect_refused("[{\"v\":\"1\",\"id\":1,\"result\":1}]", PA_ERR_INVALID_REQUEST, "object");
  expect_refused("[]", PA_ERR_INVALID_REQUEST, "object");
  return 0;
}

TEST_IMPL(proto_scalar_not_object) {
  /* A bare string, number, boolean or null is valid JSON (RFC 8259 §2; Python's json.loads takes it), so it is "not
   * an object" (-32600, as pyagent/protocol/_messages.py answers), not "not valid JSON" (-32700). */
  expect_refused("\"v\"", PA_ERR_INVALID_REQUEST, "object");
  expect_refused("42", PA_ERR_INVALID_REQUEST, "object");
  expect_refused("true", PA_ERR_INVALID_REQUEST, "object");
  expect_refused("null", PA_ERR_INVALID_REQUEST, "object");
  return 0;
}

TEST_IMPL(proto_version_mismatch) {
  expect_refused("{\"id\":1,\"method\":\"x\"}", PA_ERR_VERSION_MISMATCH, "missing");
  expect_refused("{\"v\":\"2\",\"id\":1,\"method\":\"x\"}", PA_ERR_VERSION_MISMATCH, "\"2\"");
  expect_refused("{\"v\":1,\"id\":1,\"method\":\"x\"}", PA_ERR_VERSION_MISMATCH, "non-string");
  expect_refused("{\"v\":\"\",\"id\":1,\"result\":1}", PA_ERR_VERSION_MISMATCH, "version");
  expect_refused("{\"v\":null,\"id\":1,\"result\":1}", PA_ERR_VERSION_MISMATCH, "version");
  /* The version is checked before anything else about the message. */
  expect_refused("{\"v\":\"1.0\"}", PA_ERR_VERSION_MISMATCH, "\"1\"");
  return 0;
}

TEST_IMPL(proto_bad_id) {
  expect_refused("{\"v\":\"1\",\"id\":\"7\",\"method\":\"x\"}", PA_ERR_INVALID_REQUEST, "'id'");
  expect_refused("{\"v\":\"1\",\"id\":1.5,\"method\":\"x\"}", PA_ERR_INVALID_REQUEST, "'id'");
  expect_refused("{\"v\":\"1\",\"id\":null,\"method\":\"x\"}", PA_ERR_INVALID_REQUEST, "'id'");
  expect_refused("{\"v\":\"1\",\"id\":[1],\"method\":\"x\"}", PA_ERR_INVALID_REQUEST, "'id'");
  /* Past 2^53 an id no longer survives a double: refused (2^53 + 2 is exactly representable, so no rounding hides
   * it). */
  expect_refused("{\"v\":\"1\",\"id\":9007199254740994,\"method\":\"x\"}", PA_ERR_INVALID_REQUEST, "'id'");
  expect_refused("{\"v\":\"1\",\"id\":1e300,\"result\":1}", PA_ERR_INVALID_REQUEST, "'id'");
  /* A response needs an id at all. */
  expect_refused("{\"v\":\"1\",\"result\":1}", PA_ERR_INVALID_REQUEST, "'id'");
  expect_refused("{\"v\":\"1\",\"id\":true,\"result\":1}", PA_ERR_INVALID_REQUEST, "'id'");

  /* 2^53 itself is the largest accepted. */
  pa_msg_t m;
  char why[300];
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":9007199254740992,\"result\":1}", why, sizeof why));
  ASSERT_EQ(m.id, INT64_C(9007199254740992));
  pa_msg_free(&m);
  ASSERT_OK(parse_str(&m, "{\"v\":\"1\",\"id\":-9007199254740992,\"result\":1}", why, sizeof why));
  ASSERT_EQ(m.id, -INT64_C(9007199254740992));
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_bad_method) {
  expect_refused("{\"v\":\"1\",\"id\":1,\"method\":\"\"}", PA_ERR_INVALID_REQUEST, "'method'");
  expect_refused("{\"v\":\"1\",\"id\":1,\"method\":5}", PA_ERR_INVALID_REQUEST, "'method'");
  expect_refused("{\"v\":\"1\",\"method\":null}", PA_ERR_INVALID_REQUEST, "'method'");
  return 0;
}

TEST_IMPL(proto_params_not_object) {
  expect_refused("{\"v\":\"1\",\"id\":1,\"method\":\"x\",\"params\":[1,2]}", PA_ERR_INVALID_REQUEST, "'params'");
  expect_refused("{\"v\":\"1\",\"method\":\"x\",\"params\":\"p\"}", PA_ERR_INVALID_REQUEST, "'params'");
  expect_refused("{\"v\":\"1\",\"id\":1,\"method\":\"x\",\"params\":null}", PA_ERR_INVALID_REQUEST, "'params'");
  expect_refused("{\"v\":\"1\",\"id\":1,\"method\":\"x\",\"params\":3}", PA_ERR_INVALID_REQUEST, "'params'");
  return 0;
}

TEST_IMPL(proto_response_result_xor_error) {
  expect_refused("{\"v\":\"1\",\"id\":1,\"result\":1,\"error\":{\"code\":-32603,\"message\":\"m\"}}",
                 PA_ERR_INVALID_REQUEST, "exactly one of 'result' or 'error'");
  expect_refused("{\"v\":\"1\",\"id\":1}", PA_ERR_INVALID_REQUEST, "exactly one of 'result' or 'error'");
  return 0;
}

TEST_IMPL(proto_huge_integer) {
  /* Integers past int64 are decoded as reals, so the frame is accepted; Python parses it again exactly. */
  pa_msg_t m;
  char why[300];
  ASSERT_OK(parse_str(&m,
                      "{\"v\":\"1\",\"id\":3,\"method\":\"bundle.call\",\"params\":{\"n\":"
                      "123456789012345678901234567890123456789,\"m\":-99999999999999999999999}}",
                      why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_REQUEST);
  ASSERT_EQ(m.id, 3);
  json_t *n = json_object_get(m.params, "n");
  ASSERT(json_is_real(n));
  ASSERT_DOUBLE_GE(json_real_value(n), 1.2e38);
  ASSERT_DOUBLE_LT(json_real_value(json_object_get(m.params, "m")), -9.9e22);
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_integer_beyond_double) {
  /* Protocol v1 limits numbers to the range of a double (docs/protocol.md). A 400-digit integer is refused with a parse
   * error that says why, rather than accepted with a wrong value. (Integers beyond int64 but within a double's range
   * are accepted: see proto_huge_integer.) */
  char line[600];
  char digits[401];
  memset(digits, '9', 400);
  digits[400] = '\0';
  snprintf(line, sizeof line, "{\"v\":\"1\",\"id\":4,\"method\":\"bundle.call\",\"params\":{\"n\":%s}}", digits);
  pa_msg_t m;
  char why[300];
  int rc = parse_str(&m, line, why, sizeof why);
  ASSERT_EQ(rc, PA_ERR_PARSE);
  ASSERT_STR_CONTAINS(why, "overflow");
  return 0;
}

/* `line` is one frame: it ends in its only '\n'. */
static size_t check_one_line(const char *line) {
  ASSERT_NOT_NULL(line);
  size_t len = strlen(line);
  ASSERT_GT(len, 1);
  ASSERT_EQ(line[len - 1], '\n');
  ASSERT_PTR_EQ(strchr(line, '\n'), line + len - 1);
  return len - 1;
}

TEST_IMPL(proto_builders_round_trip) {
  pa_msg_t m;
  char why[300];

  char *line = pa_proto_request_line(-3, "heartbeat.post", json_pack("{s:I, s:n}", "seq", (json_int_t)7, "rtt_ms"));
  size_t len = check_one_line(line);
  ASSERT_OK(pa_msg_parse(&m, line, len, why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_REQUEST);
  ASSERT_EQ(m.id, -3);
  ASSERT_STR_EQ(m.method, "heartbeat.post");
  ASSERT_DOUBLE_EQ(json_number_value(json_object_get(m.params, "seq")), 7.0);
  ASSERT(json_is_null(json_object_get(m.params, "rtt_ms")));
  pa_msg_free(&m);
  free(line);

  /* No params: an empty object is sent. */
  line = pa_proto_request_line(5, "handshake.hello", NULL);
  len = check_one_line(line);
  ASSERT_OK(pa_msg_parse(&m, line, len, why, sizeof why));
  ASSERT(json_is_object(m.params));
  ASSERT_EQ(json_object_size(m.params), 0);
  pa_msg_free(&m);
  free(line);

  line = pa_proto_result_line(9, json_pack("{s:f}", "timestamp", 1700000000123.0));
  len = check_one_line(line);
  ASSERT_OK(pa_msg_parse(&m, line, len, why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT_EQ(m.id, 9);
  ASSERT_DOUBLE_EQ(json_number_value(json_object_get(m.result, "timestamp")), 1700000000123.0);
  ASSERT_NULL(m.error);
  pa_msg_free(&m);
  free(line);

  int64_t id = 12;
  line = pa_proto_error_line(&id, PA_ERR_METHOD_NOT_FOUND, "host.* methods are internal to the agent", NULL);
  len = check_one_line(line);
  ASSERT_OK(pa_msg_parse(&m, line, len, why, sizeof why));
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT_EQ(m.id, 12);
  ASSERT_NULL(m.result);
  ASSERT_EQ((int64_t)json_number_value(json_object_get(m.error, "code")), PA_ERR_METHOD_NOT_FOUND);
  ASSERT_STR_EQ(json_string_value(json_object_get(m.error, "message")), "host.* methods are internal to the agent");
  ASSERT_NULL(json_object_get(m.error, "data"));
  pa_msg_free(&m);
  free(line);

  /* Every builder stamps the version. */
  line = pa_proto_result_line(1, json_null());
  ASSERT_STR_CONTAINS(line, "\"v\":\"1\"");
  free(line);
  return 0;
}

TEST_IMPL(proto_error_line_null_id) {
  /* docs/protocol.md: on a protocol violation the receiver sends one error response with "id": null naming the
   * problem. conn.c's refuse_frame builds exactly that with pa_proto_error_line(NULL, ...), so the same frame coming
   * from the endpoint must parse as an error response, not be refused as a protocol violation in turn. */
  char *line = pa_proto_error_line(NULL, PA_ERR_FRAME_TOO_LARGE, "frame longer than the limit",
                                   json_pack("{s:I}", "limit", (json_int_t)1048576));
  size_t len = check_one_line(line);
  ASSERT_STR_CONTAINS(line, "\"id\":null");
  ASSERT_STR_CONTAINS(line, "\"limit\":1048576");
  pa_msg_t m;
  char why[300] = "";
  int rc = pa_msg_parse(&m, line, len, why, sizeof why);
  free(line);
  if (rc != 0) ASSERT_FAILED("an error response with \"id\": null was refused with %d: %s", rc, why);
  ASSERT_EQ(m.kind, PA_MSG_RESPONSE);
  ASSERT_NOT_NULL(m.error);
  ASSERT_EQ((int64_t)json_number_value(json_object_get(m.error, "code")), PA_ERR_FRAME_TOO_LARGE);
  pa_msg_free(&m);
  return 0;
}

TEST_IMPL(proto_error_line_invalid_utf8_message) {
  /* A parser's message may quote bad bytes or be cut inside a UTF-8 character; the error reply must still be sent
   * (it was NULL before: found by tests/fuzz/fuzz-msg), with the bad bytes replaced. */
  const char cut[] = {'b', 'a', 'd', ' ', (char)0xC3, '\0'}; /* the first byte of a two-byte character, then the end */
  char *line = pa_proto_error_line(NULL, PA_ERR_PARSE, cut, NULL);
  size_t len = check_one_line(line);
  pa_msg_t m;
  char why[300] = "";
  int rc = pa_msg_parse(&m, line, len, why, sizeof why);
  free(line);
  ASSERT_EQ(rc, 0);
  ASSERT_STR_EQ(json_string_value(json_object_get(m.error, "message")), "bad ?");
  pa_msg_free(&m);
  return 0;
}
