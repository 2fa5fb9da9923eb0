#include "buf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int pa_buf_append(pa_buf_t *b, const char *data, size_t n) {
  if (n == 0) return 0;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return -ENOMEM;
    b->data = p;
    b->cap = cap;
  }
  memcpy(b->data + b->len, data, n);
  b->len += n;
  return 0;
}

void pa_buf_free(pa_buf_t *b) {
  free(b->data);
  memset(b, 0, sizeof *b);
}
