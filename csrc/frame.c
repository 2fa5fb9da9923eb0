#include "frame.h"

#include <string.h>

void pa_framer_init(pa_framer_t *f, size_t limit) {
  memset(f, 0, sizeof *f);
  f->limit = limit;
}

void pa_framer_free(pa_framer_t *f) { pa_buf_free(&f->held); }

size_t pa_framer_pending(const pa_framer_t *f) { return f->held.len; }

int pa_framer_feed(pa_framer_t *f, const char *data, size_t n, pa_frame_cb cb, void *ctx) {
  while (n > 0) {
    const char *nl = memchr(data, '\n', n);
    if (!nl) {
      /* No end yet: the held part plus this one must still fit, or the line is refused now, not when it ends. */
      if (f->held.len + n > f->limit) return PA_EFRAME_TOO_LARGE;
      return pa_buf_append(&f->held, data, n);
    }
    size_t part = (size_t)(nl - data);
    if (f->held.len + part > f->limit) return PA_EFRAME_TOO_LARGE;
    int rc = 0;
    if (f->held.len == 0) {
      if (part > 0) rc = cb(ctx, data, part);
    } else {
      int e = pa_buf_append(&f->held, data, part);
      if (e) return e;
      size_t len = f->held.len;
      f->held.len = 0; /* reset first: the callback may close the connection and free nothing twice */
      rc = cb(ctx, f->held.data, len);
    }
    if (rc) return rc;
    data = nl + 1;
    n -= part + 1;
  }
  return 0;
}
