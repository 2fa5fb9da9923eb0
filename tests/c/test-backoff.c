/* Reconnect backoff (backoff.h): capped exponential ceilings with full jitter, and the same generator's [0, 1) draws
 * for heartbeat jitter. */
#include <stdint.h>

#include "backoff.h"
#include "task.h"

TEST_IMPL(backoff_delay_within_ceiling) {
  pa_backoff_t b;
  for (uint64_t seed = 1; seed <= 50; seed++) {
    pa_backoff_init(&b, 100, 30000, seed);
    for (int i = 0; i < 40; i++) {
      uint64_t ceiling = pa_backoff_ceiling(&b);
      uint64_t d = pa_backoff_next(&b);
      ASSERT_UINT64_LE(d, ceiling);
    }
  }
  /* Full jitter really spreads: over many draws at one ceiling both halves of [0, ceiling] are hit. */
  pa_backoff_init(&b, 1000, 1000, 7);
  int low = 0, high = 0;
  for (int i = 0; i < 1000; i++) {
    uint64_t d = pa_backoff_next(&b);
    ASSERT_UINT64_LE(d, 1000);
    if (d < 500) low++;
    else high++;
  }
  ASSERT_GT(low, 300);
  ASSERT_GT(high, 300);
  return 0;
}

TEST_IMPL(backoff_ceiling_doubles_and_caps) {
  static const uint64_t expected[] = {500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000};
  pa_backoff_t b;
  pa_backoff_init(&b, 500, 60000, 1); /* the host config's defaults */
  for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++) {
    ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), expected[i]);
    ASSERT_UINT64_EQ(b.attempt, i);
    pa_backoff_next(&b);
  }
  /* The ceiling is a function of the attempt count only: asking does not advance it. */
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 60000);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 60000);
  return 0;
}

TEST_IMPL(backoff_never_above_max) {
  pa_backoff_t b;
  pa_backoff_init(&b, 3, 86400000, 12345); /* the largest reconnect_max_ms the config allows */
  uint64_t prev = 0;
  for (int i = 0; i < 10000; i++) {
    uint64_t ceiling = pa_backoff_ceiling(&b);
    ASSERT_UINT64_GE(ceiling, prev); /* never shrinks without a reset */
    ASSERT_UINT64_LE(ceiling, 86400000);
    ASSERT_UINT64_LE(pa_backoff_next(&b), 86400000);
    prev = ceiling;
  }
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 86400000);
  return 0;
}

TEST_IMPL(backoff_reset) {
  pa_backoff_t b;
  pa_backoff_init(&b, 250, 10000, 99);
  for (int i = 0; i < 20; i++) pa_backoff_next(&b);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 10000);
  pa_backoff_reset(&b);
  ASSERT_UINT64_EQ(b.attempt, 0);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 250);
  ASSERT_UINT64_LE(pa_backoff_next(&b), 250);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 500);
  return 0;
}

TEST_IMPL(backoff_seeds_differ) {
  /* Agents restarted together must not reconnect in lockstep: distinct seeds give distinct sequences, and one seed
   * always gives the same sequence. */
  pa_backoff_t a, b, a2;
  pa_backoff_init(&a, 1000, 1000000, 1);
  pa_backoff_init(&b, 1000, 1000000, 2);
  pa_backoff_init(&a2, 1000, 1000000, 1);
  int differ = 0;
  for (int i = 0; i < 20; i++) {
    uint64_t da = pa_backoff_next(&a);
    uint64_t db = pa_backoff_next(&b);
    ASSERT_UINT64_EQ(pa_backoff_next(&a2), da);
    differ += da != db;
  }
  ASSERT_GE(differ, 15);
  /* Seed 0 is legal (the generator replaces it) and does not get stuck at zero. */
  pa_backoff_t z;
  pa_backoff_init(&z, 1000, 1000, 0);
  ASSERT_UINT64_NE(z.rng, 0);
  int nonzero = 0;
  for (int i = 0; i < 10; i++) nonzero += pa_backoff_next(&z) != 0;
  ASSERT_GE(nonzero, 8);
  return 0;
}

TEST_IMPL(backoff_unit_range) {
  pa_backoff_t b;
  pa_backoff_init(&b, 1, 1, 42);
  double sum = 0, lo = 1, hi = 0;
  for (int i = 0; i < 100000; i++) {
    double u = pa_backoff_unit(&b);
    ASSERT_DOUBLE_GE(u, 0.0);
    ASSERT_DOUBLE_LT(u, 1.0);
    sum += u;
    if (u < lo) lo = u;
    if (u > hi) hi = u;
  }
  /* Uniform enough for heartbeat jitter: mean near 1/2, the range nearly covered. */
  ASSERT_DOUBLE_GE(sum / 100000, 0.49);
  ASSERT_DOUBLE_LT(sum / 100000, 0.51);
  ASSERT_DOUBLE_LT(lo, 0.001);
  ASSERT_DOUBLE_GE(hi, 0.999);
  return 0;
}

TEST_IMPL(backoff_init_clamps) {
  pa_backoff_t b;
  /* min 0 would never grow: it becomes 1. max below min becomes min. */
  pa_backoff_init(&b, 0, 8, 5);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 1);
  pa_backoff_next(&b);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 2);
  pa_backoff_init(&b, 5000, 10, 5);
  ASSERT_UINT64_EQ(b.max_ms, 5000);
  for (int i = 0; i < 5; i++) ASSERT_UINT64_LE(pa_backoff_next(&b), 5000);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), 5000);
  return 0;
}

TEST_IMPL(backoff_extreme_max) {
  /* backoff.h promises min(max_ms, min_ms * 2^attempt) for any uint64 bounds. With a max near UINT64_MAX the
   * doubling must saturate at max, not wrap to 0. */
  pa_backoff_t b;
  pa_backoff_init(&b, 1, UINT64_MAX, 3);
  uint64_t prev = 1;
  for (int i = 0; i < 100; i++) {
    uint64_t ceiling = pa_backoff_ceiling(&b);
    ASSERT_UINT64_GE(ceiling, prev);
    prev = ceiling;
    pa_backoff_next(&b);
  }
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), UINT64_MAX);
  /* A ceiling of UINT64_MAX: the draw must not take a remainder modulo ceiling + 1 == 0. */
  pa_backoff_init(&b, UINT64_MAX, UINT64_MAX, 3);
  ASSERT_UINT64_EQ(pa_backoff_ceiling(&b), UINT64_MAX);
  (void)pa_backoff_next(&b);
  return 0;
}
