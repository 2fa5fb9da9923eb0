/* The two byte queues between the libuv thread and the Python main thread (DESIGN §2, model A). Each side appends
 * whole lines under a short lock and the other swaps the whole buffer out, so there is one wakeup per batch, not per
 * message. C -> Python is signalled with an eventfd (watched by asyncio's add_reader); Python -> C with uv_async_send.
 * Lines are "<session> <json>\n". */
#ifndef PA_BRIDGE_H
#define PA_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "buf.h"

typedef struct pa_bridge_s {
  uv_mutex_t lock;
  int efd;              /* readable while to_py holds data */
  pa_buf_t to_py;
  uint64_t to_py_since; /* uv_hrtime() when to_py last went from empty to non-empty */
  uint64_t dropped_to_py;
  size_t to_py_limit;
  pa_buf_t to_c;
  uv_async_t *wake_c;   /* set while the libuv thread runs */
} pa_bridge_t;

int pa_bridge_init(pa_bridge_t *b, size_t to_py_limit);
void pa_bridge_free(pa_bridge_t *b);

/* libuv thread: hand a batch of complete lines to Python. Past the limit the batch is dropped and counted (Python is
 * stuck; the endpoint's requests will time out, which is what it would see from a dead agent anyway). */
int pa_bridge_put_py(pa_bridge_t *b, const char *data, size_t n);
/* Python thread: take everything queued for Python into `out` (swapped, so `out` must be empty or freed). */
void pa_bridge_take_py(pa_bridge_t *b, pa_buf_t *out);
/* Python thread: queue lines for C and wake the libuv thread. */
int pa_bridge_put_c(pa_bridge_t *b, const char *data, size_t n);
/* libuv thread: take everything queued for C. */
void pa_bridge_take_c(pa_bridge_t *b, pa_buf_t *out);
/* How long Python has left its queue undrained, in ms (0 when drained). */
uint64_t pa_bridge_py_lag_ms(pa_bridge_t *b);

#endif
