/* NDJSON framing: split a byte stream into lines, refusing any line longer than the limit before it is parsed. */
#ifndef PA_FRAME_H
#define PA_FRAME_H

#include <stddef.h>

#include "buf.h"

/* Returned by pa_framer_feed when a line is longer than the limit. */
#define PA_EFRAME_TOO_LARGE (-7001)

/* Called for every complete, non-empty line (without its '\n'). A non-zero return stops the feed and is returned. */
typedef int (*pa_frame_cb)(void *ctx, const char *line, size_t len);

typedef struct pa_framer_s {
  pa_buf_t held; /* the start of a line whose end has not arrived yet */
  size_t limit; /* longest accepted line, newline not counted */
} pa_framer_t;

void pa_framer_init(pa_framer_t *f, size_t limit);
void pa_framer_free(pa_framer_t *f);

/* Feed bytes as they arrive. Complete lines that lie wholly inside `data` are passed to `cb` without a copy.
 * Returns 0, the callback's non-zero value, PA_EFRAME_TOO_LARGE, or -ENOMEM. After an error the framer must not be
 * fed again (the connection is closed). */
int pa_framer_feed(pa_framer_t *f, const char *data, size_t n, pa_frame_cb cb, void *ctx);

/* Bytes of an incomplete line held. */
size_t pa_framer_pending(const pa_framer_t *f);

#endif
