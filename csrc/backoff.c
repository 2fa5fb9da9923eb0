#include "backoff.h"

void pa_backoff_init(pa_backoff_t *b, uint64_t min_ms, uint64_t max_ms, uint64_t seed) {
  b->min_ms = min_ms ? min_ms : 1;
  b->max_ms = max_ms < b->min_ms ? b->min_ms : max_ms;
  b->attempt = 0;
  b->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
}

uint64_t pa_backoff_ceiling(const pa_backoff_t *b) {
  uint64_t c = b->min_ms;
  for (unsigned i = 0; i < b->attempt && c < b->max_ms; i++) c = c > b->max_ms / 2 ? b->max_ms : c * 2;
  return c > b->max_ms ? b->max_ms : c;
}

static uint64_t next_random(pa_backoff_t *b) {
  uint64_t x = b->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  b->rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

uint64_t pa_backoff_next(pa_backoff_t *b) {
  uint64_t ceiling = pa_backoff_ceiling(b);
  if (b->attempt < 64) b->attempt++;
  uint64_t r = next_random(b);
  return ceiling == UINT64_MAX ? r : r % (ceiling + 1);
}

double pa_backoff_unit(pa_backoff_t *b) { return (double)(next_random(b) >> 11) / 9007199254740992.0; }

void pa_backoff_reset(pa_backoff_t *b) { b->attempt = 0; }
