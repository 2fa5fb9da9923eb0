/* The test harness, after libuv's test/task.h: TEST_IMPL defines a test, typed ASSERT_* macros abort with both values
 * printed, and every test that runs a loop ends with MAKE_VALGRIND_HAPPY so the loop is closed and ASan/LSan see
 * nothing left behind. A failed assertion aborts the process: ctest runs each test as its own process. */
#ifndef PA_TEST_TASK_H
#define PA_TEST_TASK_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#define TEST_IMPL(name)        \
  int run_test_##name(void);   \
  int run_test_##name(void)

/* A test that cannot run here (not a failure) returns RETURN_SKIP; ctest shows it as skipped (SKIP_RETURN_CODE). */
#define PA_TEST_SKIP 77
#define RETURN_SKIP(why)                                   \
  do {                                                     \
    fprintf(stderr, "skipped: %s\n", (why));               \
    return PA_TEST_SKIP;                                   \
  } while (0)

#define ASSERT_FAILED(fmt, ...)                                                                      \
  do {                                                                                               \
    fprintf(stderr, "Assertion failed in %s on line %d: " fmt "\n", __FILE__, __LINE__, __VA_ARGS__); \
    fflush(stderr);                                                                                  \
    abort();                                                                                         \
  } while (0)

#define ASSERT_BASE(a, op, b, type, conv)                                                                  \
  do {                                                                                                     \
    type const eval_a_ = (a);                                                                        \
    type const eval_b_ = (b);                                                                        \
    if (!(eval_a_ op eval_b_))                                                                             \
      ASSERT_FAILED("`%s %s %s` (%" conv " %s %" conv ")", #a, #op, #b, eval_a_, #op, eval_b_);            \
  } while (0)

#define ASSERT(expr)                                          \
  do {                                                        \
    if (!(expr)) ASSERT_FAILED("`%s` is false", #expr);       \
  } while (0)

#define ASSERT_EQ(a, b) ASSERT_BASE(a, ==, b, int64_t, PRId64)
#define ASSERT_NE(a, b) ASSERT_BASE(a, !=, b, int64_t, PRId64)
#define ASSERT_LT(a, b) ASSERT_BASE(a, <, b, int64_t, PRId64)
#define ASSERT_LE(a, b) ASSERT_BASE(a, <=, b, int64_t, PRId64)
#define ASSERT_GT(a, b) ASSERT_BASE(a, >, b, int64_t, PRId64)
#define ASSERT_GE(a, b) ASSERT_BASE(a, >=, b, int64_t, PRId64)
#define ASSERT_OK(a) ASSERT_BASE(a, ==, 0, int64_t, PRId64)

#define ASSERT_UINT64_EQ(a, b) ASSERT_BASE(a, ==, b, uint64_t, PRIu64)
#define ASSERT_UINT64_NE(a, b) ASSERT_BASE(a, !=, b, uint64_t, PRIu64)
#define ASSERT_UINT64_LT(a, b) ASSERT_BASE(a, <, b, uint64_t, PRIu64)
#define ASSERT_UINT64_LE(a, b) ASSERT_BASE(a, <=, b, uint64_t, PRIu64)
#define ASSERT_UINT64_GE(a, b) ASSERT_BASE(a, >=, b, uint64_t, PRIu64)

#define ASSERT_DOUBLE_EQ(a, b) ASSERT_BASE(a, ==, b, double, "f")
#define ASSERT_DOUBLE_LT(a, b) ASSERT_BASE(a, <, b, double, "f")
#define ASSERT_DOUBLE_GE(a, b) ASSERT_BASE(a, >=, b, double, "f")

#define ASSERT_NULL(a)                                                      \
  do {                                                                      \
    const void *eval_p_ = (const void *)(a);                                \
    if (eval_p_ != NULL) ASSERT_FAILED("`%s` is %p, not NULL", #a, eval_p_); \
  } while (0)

#define ASSERT_NOT_NULL(a)                                         \
  do {                                                             \
    if ((a) == NULL) ASSERT_FAILED("`%s` is NULL", #a);             \
  } while (0)

#define ASSERT_PTR_EQ(a, b)                                                                           \
  do {                                                                                                \
    const void *eval_pa_ = (const void *)(a);                                                         \
    const void *eval_pb_ = (const void *)(b);                                                         \
    if (eval_pa_ != eval_pb_) ASSERT_FAILED("`%s == %s` (%p == %p)", #a, #b, eval_pa_, eval_pb_);     \
  } while (0)

#define ASSERT_STR_EQ(a, b)                                                                         \
  do {                                                                                              \
    const char *eval_sa_ = (a);                                                                     \
    const char *eval_sb_ = (b);                                                                     \
    if (!eval_sa_ || !eval_sb_ || strcmp(eval_sa_, eval_sb_) != 0)                                  \
      ASSERT_FAILED("`%s == %s` (\"%s\" == \"%s\")", #a, #b, eval_sa_ ? eval_sa_ : "(null)",       \
                    eval_sb_ ? eval_sb_ : "(null)");                                                \
  } while (0)

/* `hay` contains `needle`: the tests check that error messages name what is wrong. */
#define ASSERT_STR_CONTAINS(hay, needle)                                                               \
  do {                                                                                                 \
    const char *eval_h_ = (hay);                                                                       \
    const char *eval_n_ = (needle);                                                                    \
    if (!eval_h_ || !strstr(eval_h_, eval_n_))                                                         \
      ASSERT_FAILED("`%s` (\"%s\") does not contain \"%s\"", #hay, eval_h_ ? eval_h_ : "(null)", eval_n_); \
  } while (0)

#define ASSERT_MEM_EQ(a, b, n)                                                      \
  do {                                                                              \
    if (memcmp((a), (b), (n)) != 0) ASSERT_FAILED("`%s` and `%s` differ in their first %zu bytes", #a, #b, (size_t)(n)); \
  } while (0)

static inline void pa_test_close_walk_cb(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (!uv_is_closing(handle)) uv_close(handle, NULL);
}

/* Close whatever is still open on `loop`, let the close callbacks run, and check the loop closes cleanly. */
#define MAKE_VALGRIND_HAPPY(loop)                          \
  do {                                                     \
    uv_walk((loop), pa_test_close_walk_cb, NULL);          \
    uv_run((loop), UV_RUN_DEFAULT);                        \
    ASSERT_OK(uv_loop_close(loop));                        \
  } while (0)

#endif
