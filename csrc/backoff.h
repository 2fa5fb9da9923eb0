/* Reconnect delays: capped exponential backoff with full jitter (delay drawn uniformly from [0, ceiling]). */
#ifndef PA_BACKOFF_H
#define PA_BACKOFF_H

#include <stdint.h>

typedef struct pa_backoff_s {
  uint64_t min_ms;   /* ceiling of the first attempt */
  uint64_t max_ms;   /* the ceiling never grows past this */
  unsigned attempt;  /* attempts since the last reset */
  uint64_t rng;      /* xorshift64* state, never 0 */
} pa_backoff_t;

void pa_backoff_init(pa_backoff_t *b, uint64_t min_ms, uint64_t max_ms, uint64_t seed);
/* The ceiling for the next attempt: min(max_ms, min_ms * 2^attempt). */
uint64_t pa_backoff_ceiling(const pa_backoff_t *b);
/* The delay before the next attempt, in [0, ceiling]; advances the attempt counter. */
uint64_t pa_backoff_next(pa_backoff_t *b);
/* A uniform random number in [0, 1) from the same generator (heartbeat jitter). */
double pa_backoff_unit(pa_backoff_t *b);
/* After a stable session: start again from min_ms. */
void pa_backoff_reset(pa_backoff_t *b);

#endif
