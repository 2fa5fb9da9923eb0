/* A growable byte buffer: the bridge queues, the worker's batches and the framer's partial line all use it. */
#ifndef PA_BUF_H
#define PA_BUF_H

#include <stddef.h>

typedef struct pa_buf_s {
  char *data;
  size_t len;
  size_t cap;
} pa_buf_t;

/* Append n bytes (growing by doubling); 0 or -ENOMEM. Appending nothing is a no-op. */
int pa_buf_append(pa_buf_t *b, const char *data, size_t n);
void pa_buf_free(pa_buf_t *b);

#endif
