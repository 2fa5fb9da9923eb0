/* libFuzzer target: pa_framer_feed against a simple model.
 *
 * Input: byte 0 picks the line limit (1..256), byte 1 seeds the chunk sizes; the rest is the stream, fed in chunks.
 * Model: the lines delivered are exactly the non-empty lines before the first line longer than the limit (complete
 * or not); the feed fails with PA_EFRAME_TOO_LARGE iff such a line exists; otherwise the unterminated tail is held. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"

typedef struct {
  const uint8_t *expect; /* the stream: delivered lines must match it in order */
  size_t size;
  size_t pos;            /* where the next expected line starts */
  size_t limit;
  size_t delivered;
} model_t;

/* The next non-empty line of the model from m->pos: its start and length, or 0 when there is none complete. */
static int next_line(const model_t *m, size_t *start, size_t *len) {
  size_t p = m->pos;
  for (;;) {
    const uint8_t *nl = p < m->size ? memchr(m->expect + p, '\n', m->size - p) : NULL;
    if (!nl) return 0;
    size_t l = (size_t)(nl - (m->expect + p));
    if (l > 0) {
      *start = p;
      *len = l;
      return 1;
    }
    p++; /* an empty line: skipped by the framer */
  }
}

static int on_line(void *ctx, const char *line, size_t len) {
  model_t *m = ctx;
  size_t start, l;
  if (!next_line(m, &start, &l)) abort();                /* a line the model does not have */
  if (l != len || len > m->limit || len == 0) abort();
  if (memcmp(m->expect + start, line, len) != 0) abort();
  if (memchr(line, '\n', len)) abort();
  m->pos = start + l + 1;
  m->delivered++;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  size_t limit = (size_t)data[0] + 1;
  uint32_t seed = data[1];
  const uint8_t *stream = data + 2;
  size_t n = size - 2;

  /* The model: is there an over-limit line (complete, or the unterminated tail)? */
  int too_large = 0;
  size_t tail = 0;
  {
    size_t p = 0;
    while (p < n) {
      const uint8_t *nl = memchr(stream + p, '\n', n - p);
      size_t l = nl ? (size_t)(nl - (stream + p)) : n - p;
      if (l > limit) {
        too_large = 1;
        break;
      }
      if (!nl) {
        tail = l;
        break;
      }
      p += l + 1;
    }
  }

  model_t m = {stream, n, 0, limit, 0};
  pa_framer_t f;
  pa_framer_init(&f, limit);
  int rc = 0;
  size_t off = 0;
  while (off < n && rc == 0) {
    seed = seed * 1103515245u + 12345u;
    size_t chunk = 1 + (seed >> 16) % 64;
    if (chunk > n - off) chunk = n - off;
    /* A copy of exactly the chunk: ASan catches any read past it. */
    char *copy = malloc(chunk);
    if (!copy) abort();
    memcpy(copy, stream + off, chunk);
    rc = pa_framer_feed(&f, copy, chunk, on_line, &m);
    free(copy);
    off += chunk;
  }
  if (too_large) {
    if (rc != PA_EFRAME_TOO_LARGE) abort();
    /* Every line before the long one was delivered. */
    size_t s, l;
    if (next_line(&m, &s, &l)) {
      if (l <= limit) abort();
    }
  } else {
    if (rc != 0) abort();
    size_t s, l;
    if (next_line(&m, &s, &l)) abort(); /* a complete line was not delivered */
    if (pa_framer_pending(&f) != tail) abort();
  }
  pa_framer_free(&f);
  return 0;
}
