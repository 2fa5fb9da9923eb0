#include "frame.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void pa_framer_init(pa_framer_t *f, size_t limit) {
  memset(f, 0, sizeof *f);
  f->limit = limit;
}

void pa_framer_free(pa_framer_t *f) {
  free(f->buf);
  f->buf = NULL;
  f->len = f->cap = 0;
}

size_t pa_framer_pending(const pa_framer_t *f) { return f->len; }

static int hold(pa_framer_t *f, const char *data, size_t n) {
  if (f->len + n > f->cap) {
    size_t cap = f->cap ? f->cap : 4096;
    while (cap < f->len + n) cap *= 2;
    char *p = realloc(f->buf, cap);
    if (!p) return -ENOMEM;
    f->buf = p;
    f->cap = cap;
  }
  memcpy(f->buf + f->len, data, n);
  f->len += n;
  return 0;
}

int pa_framer_feed(pa_framer_t *f, const char *data, size_t n, pa_frame_cb cb, void *ctx) {
  while (n > 0) {
    const char *nl = memchr(data, '\n', n);
    if (!nl) {
      /* No end yet: the held part plus this one must still fit, or the line is refused now, not when it ends. */
      if (f->len + n > f->limit) return PA_EFRAME_TOO_LARGE;
      return hold(f, data, n);
    }
    size_t part = (size_t)(nl - data);
    if (f->len + part > f->limit) return PA_EFRAME_TOO_LARGE;
    int rc = 0;
    if (f->len == 0) {
      if (part > 0) rc = cb(ctx, data, part);
    } else {
      int e = hold(f, data, part);
      if (e) return e;
      size_t len = f->len;
      f->len = 0; /* reset first: the callback may close the connection and free nothing twice */
      rc = cb(ctx, f->buf, len);
    }
    if (rc) return rc;
    data = nl + 1;
    n -= part + 1;
  }
  return 0;
}
