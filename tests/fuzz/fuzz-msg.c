/* libFuzzer target: pa_msg_parse (every frame from the endpoint, the hello reply included) must accept or refuse any
 * bytes without a memory error, leave nothing to free when it refuses, return a consistent message when it accepts,
 * and give a reason that fits in `why`. An error reply built from that reason must itself parse. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* A copy of exactly the frame (no terminating NUL): the parser must honour `len`. */
  char *line = malloc(size ? size : 1);
  if (!line) abort();
  memcpy(line, data, size);
  pa_msg_t m;
  char why[256];
  memset(why, 'x', sizeof why);
  int rc = pa_msg_parse(&m, line, size, why, sizeof why);
  free(line);
  if (rc == 0) {
    if (!m.root) abort();
    switch (m.kind) {
      case PA_MSG_REQUEST:
      case PA_MSG_NOTIFICATION:
        if (!m.method) abort();
        break;
      case PA_MSG_RESPONSE:
        if ((m.result == NULL) == (m.error == NULL)) abort();
        break;
      default:
        abort();
    }
    pa_msg_free(&m);
    return 0;
  }
  if (m.root) abort();
  if (!memchr(why, '\0', sizeof why)) abort();
  if (rc > -32000 && rc != PA_ERR_PARSE && rc != PA_ERR_INVALID_REQUEST && rc != PA_ERR_METHOD_NOT_FOUND &&
      rc != PA_ERR_INVALID_PARAMS && rc != PA_ERR_INTERNAL)
    abort();
  /* The host answers a bad frame with this error line: it must be a valid frame itself. */
  char *reply = pa_proto_error_line(NULL, rc, why, NULL);
  if (!reply) abort();
  size_t len = strlen(reply);
  if (len == 0 || reply[len - 1] != '\n') abort();
  pa_msg_t back;
  char why2[256];
  if (pa_msg_parse(&back, reply, len - 1, why2, sizeof why2) != 0) abort();
  if (back.kind != PA_MSG_RESPONSE || !back.id_null || !back.error) abort();
  pa_msg_free(&back);
  free(reply);
  return 0;
}
