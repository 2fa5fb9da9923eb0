#include "bridge.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void swap_out(pa_buf_t *from, pa_buf_t *to) {
  pa_buf_t tmp = *to;
  *to = *from;
  *from = tmp;
  from->len = 0;
}

int pa_bridge_init(pa_bridge_t *b, size_t to_py_limit) {
  memset(b, 0, sizeof *b);
  b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (b->efd < 0) return -errno;
  if (uv_mutex_init(&b->lock)) {
    close(b->efd);
    b->efd = -1;
    return -ENOMEM;
  }
  b->to_py_limit = to_py_limit;
  return 0;
}

void pa_bridge_free(pa_bridge_t *b) {
  if (b->efd >= 0) close(b->efd);
  uv_mutex_destroy(&b->lock);
  pa_buf_free(&b->to_py);
  pa_buf_free(&b->to_c);
  b->efd = -1;
}

int pa_bridge_put_py(pa_bridge_t *b, const char *data, size_t n) {
  int rc = 0;
  if (n == 0) return 0;
  uv_mutex_lock(&b->lock);
  int was_empty = b->to_py.len == 0;
  if (b->to_py.len + n > b->to_py_limit) {
    b->dropped_to_py++;
    rc = -ENOBUFS;
  } else {
    rc = pa_buf_append(&b->to_py, data, n);
    if (rc == 0 && was_empty) {
      uint64_t one = 1;
      b->to_py_since = uv_hrtime();
      /* Cannot fail short of a counter overflow; the reader resets it on every take. */
      ssize_t w = write(b->efd, &one, sizeof one);
      (void)w;
    }
  }
  uv_mutex_unlock(&b->lock);
  return rc;
}

void pa_bridge_take_py(pa_bridge_t *b, pa_buf_t *out) {
  uv_mutex_lock(&b->lock);
  uint64_t v;
  ssize_t r = read(b->efd, &v, sizeof v); /* reset the eventfd; EAGAIN when it was not set */
  (void)r;
  swap_out(&b->to_py, out);
  uv_mutex_unlock(&b->lock);
}

int pa_bridge_put_c(pa_bridge_t *b, const char *data, size_t n) {
  uv_mutex_lock(&b->lock);
  int rc = pa_buf_append(&b->to_c, data, n);
  /* Under the lock: the libuv thread clears wake_c under it before closing the handle, so we never wake a closed
   * handle. uv_async_send does not block. */
  if (rc == 0 && b->wake_c) uv_async_send(b->wake_c);
  uv_mutex_unlock(&b->lock);
  return rc;
}

void pa_bridge_take_c(pa_bridge_t *b, pa_buf_t *out) {
  uv_mutex_lock(&b->lock);
  swap_out(&b->to_c, out);
  uv_mutex_unlock(&b->lock);
}

uint64_t pa_bridge_py_lag_ms(pa_bridge_t *b) {
  uv_mutex_lock(&b->lock);
  uint64_t lag = b->to_py.len ? (uv_hrtime() - b->to_py_since) / 1000000u : 0;
  uv_mutex_unlock(&b->lock);
  return lag;
}
