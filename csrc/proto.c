#include "proto.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double pa_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* Integers are decoded as reals so that a frame with an integer beyond int64 in its params is still accepted (the
 * runtime parses it again with Python's unbounded ints); an id must then be integral and within 2^53. A number beyond
 * the range of a double (over ~308 digits) is refused: protocol v1 limits numbers to that range (docs/protocol.md). */
static int get_id(json_t *v, int64_t *out) {
  if (!json_is_number(v)) return -1;
  double d = json_number_value(v);
  if (!isfinite(d) || d != floor(d) || fabs(d) > 9007199254740992.0) return -1;
  *out = (int64_t)d;
  return 0;
}

int pa_msg_parse(pa_msg_t *m, const char *line, size_t len, char *why, size_t whylen) {
  memset(m, 0, sizeof *m);
  json_error_t jerr;
  m->root = json_loadb(line, len, JSON_DECODE_INT_AS_REAL | JSON_DECODE_ANY, &jerr);
  if (!m->root) {
    snprintf(why, whylen, "invalid JSON at byte %d: %s", jerr.position, jerr.text);
    return PA_ERR_PARSE;
  }
  if (!json_is_object(m->root)) {
    snprintf(why, whylen, "a frame must be a JSON object");
    goto invalid;
  }
  json_t *v = json_object_get(m->root, "v");
  if (!json_is_string(v) || strcmp(json_string_value(v), PA_PROTO_VERSION) != 0) {
    char got[64] = "missing";
    if (json_is_string(v)) snprintf(got, sizeof got, "\"%.40s\"", json_string_value(v));
    else if (v) snprintf(got, sizeof got, "a non-string");
    snprintf(why, whylen, "unsupported protocol version %s, this side speaks \"" PA_PROTO_VERSION "\"", got);
    pa_msg_free(m);
    return PA_ERR_VERSION_MISMATCH;
  }
  json_t *method = json_object_get(m->root, "method");
  json_t *id = json_object_get(m->root, "id");
  if (method) {
    if (!json_is_string(method) || json_string_length(method) == 0) {
      snprintf(why, whylen, "'method' must be a non-empty string");
      goto invalid;
    }
    m->method = json_string_value(method);
    m->params = json_object_get(m->root, "params");
    if (m->params && !json_is_object(m->params)) {
      snprintf(why, whylen, "'params' must be an object");
      goto invalid;
    }
    if (id) {
      if (get_id(id, &m->id)) {
        snprintf(why, whylen, "'id' must be an integer");
        goto invalid;
      }
      m->kind = PA_MSG_REQUEST;
    } else {
      m->kind = PA_MSG_NOTIFICATION;
    }
    return 0;
  }
  m->result = json_object_get(m->root, "result");
  m->error = json_object_get(m->root, "error");
  if (json_is_null(id) && m->error && !m->result) {
    m->id_null = 1; /* the peer refused one of our frames and is closing */
  } else if (!id || get_id(id, &m->id)) {
    snprintf(why, whylen, "a response needs an integer 'id'");
    goto invalid;
  }
  if ((m->result != NULL) == (m->error != NULL)) {
    snprintf(why, whylen, "a response needs exactly one of 'result' or 'error'");
    goto invalid;
  }
  m->kind = PA_MSG_RESPONSE;
  return 0;

invalid:
  pa_msg_free(m);
  return PA_ERR_INVALID_REQUEST;
}

void pa_msg_free(pa_msg_t *m) {
  if (m->root) json_decref(m->root);
  memset(m, 0, sizeof *m);
}

static char *dump_line(json_t *msg) {
  if (!msg) return NULL;
  char *s = json_dumps(msg, JSON_COMPACT);
  json_decref(msg);
  if (!s) return NULL;
  size_t n = strlen(s);
  char *line = realloc(s, n + 2);
  if (!line) {
    free(s);
    return NULL;
  }
  line[n] = '\n';
  line[n + 1] = '\0';
  return line;
}

char *pa_proto_error_line(const int64_t *id, int code, const char *message, json_t *data) {
  json_t *err = json_pack("{s:i, s:s}", "code", code, "message", message);
  if (!err && message) {
    /* Not valid UTF-8 (a parser's message may quote the bad bytes, or be cut inside a character): send it with
     * every non-ASCII byte as '?' rather than no error at all (found by tests/fuzz/fuzz-msg). */
    char *ascii = strdup(message);
    if (ascii) {
      for (char *p = ascii; *p; p++)
        if ((unsigned char)*p >= 0x80) *p = '?';
      err = json_pack("{s:i, s:s}", "code", code, "message", ascii);
      free(ascii);
    }
  }
  if (err && data) json_object_set_new(err, "data", data);
  else if (data) json_decref(data);
  if (!err) return NULL;
  return dump_line(json_pack("{s:s, s:o, s:o}", "v", PA_PROTO_VERSION, "id", id ? json_integer(*id) : json_null(),
                             "error", err));
}

char *pa_proto_result_line(int64_t id, json_t *result) {
  return dump_line(json_pack("{s:s, s:I, s:o}", "v", PA_PROTO_VERSION, "id", (json_int_t)id, "result", result));
}

char *pa_proto_request_line(int64_t id, const char *method, json_t *params) {
  return dump_line(json_pack("{s:s, s:I, s:s, s:o}", "v", PA_PROTO_VERSION, "id", (json_int_t)id, "method", method,
                             "params", params ? params : json_object()));
}
