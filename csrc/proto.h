/* The C side of protocol v1 (docs/protocol.md): check a frame's envelope, and build the few messages C sends itself
 * (hello, heartbeats, errors). Requests the host sends use negative ids; the Python runtime uses positive ones, so a
 * response is routed by the sign of its id. */
#ifndef PA_PROTO_H
#define PA_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define PA_PROTO_VERSION "1"

#define PA_ERR_PARSE (-32700)
#define PA_ERR_INVALID_REQUEST (-32600)
#define PA_ERR_METHOD_NOT_FOUND (-32601)
#define PA_ERR_INVALID_PARAMS (-32602)
#define PA_ERR_INTERNAL (-32603)
#define PA_ERR_UNAUTHORIZED (-32000)
#define PA_ERR_RATE_LIMITED (-32001)
#define PA_ERR_VERSION_MISMATCH (-32002)
#define PA_ERR_AGENT_UNAVAILABLE (-32003)
#define PA_ERR_TIMEOUT (-32004)
#define PA_ERR_FRAME_TOO_LARGE (-32005)
#define PA_ERR_AGENT_PAUSED (-32006)
#define PA_ERR_NOT_ALLOWED (-32007)
#define PA_ERR_ENROLLMENT_PENDING (-32010)
#define PA_ERR_AGENT_BUSY (-32011) /* agent.update: another update is running, staged or in probation */

typedef enum { PA_MSG_REQUEST, PA_MSG_NOTIFICATION, PA_MSG_RESPONSE } pa_msg_kind_t;

typedef struct pa_msg_s {
  pa_msg_kind_t kind;
  json_t *root;
  const char *method; /* requests and notifications */
  int64_t id;         /* requests and responses */
  int id_null;        /* an error response with "id": null: the peer reports a protocol violation */
  json_t *params;     /* may be NULL */
  json_t *result;     /* responses: exactly one of result/error */
  json_t *error;
} pa_msg_t;

/* Parse and check one frame. 0 on success (free with pa_msg_free); otherwise the protocol error code to answer with,
 * and `why` says what is wrong in words fit for a log line and an error message. */
int pa_msg_parse(pa_msg_t *m, const char *line, size_t len, char *why, size_t whylen);
void pa_msg_free(pa_msg_t *m);

/* Builders return a malloc'd line that ends in '\n' (free it), or NULL when out of memory. */
char *pa_proto_error_line(const int64_t *id, int code, const char *message, json_t *data /* stolen, may be NULL */);
char *pa_proto_result_line(int64_t id, json_t *result /* stolen */);
char *pa_proto_request_line(int64_t id, const char *method, json_t *params /* stolen */);

/* Milliseconds since the epoch, from the wall clock. */
double pa_wall_ms(void);

#endif
