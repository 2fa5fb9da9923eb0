/* The byte queues between the libuv thread and the Python thread (bridge.h): batches are swapped out whole, the
 * eventfd is readable exactly while Python has something to take, the Python-bound queue is bounded. */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "bridge.h"
#include "task.h"

/* 1 when the bridge's eventfd would wake asyncio's add_reader now. */
static int efd_readable(const pa_bridge_t *b) {
  struct pollfd p = {.fd = b->efd, .events = POLLIN};
  int n = poll(&p, 1, 0);
  ASSERT_GE(n, 0);
  return n == 1 && (p.revents & POLLIN);
}

static int put_py_str(pa_bridge_t *b, const char *s) { return pa_bridge_put_py(b, s, strlen(s)); }

TEST_IMPL(bridge_put_take_py) {
  pa_bridge_t b;
  ASSERT_OK(pa_bridge_init(&b, 1 << 20));
  ASSERT_GE(b.efd, 0);
  ASSERT_EQ(efd_readable(&b), 0);

  ASSERT_OK(put_py_str(&b, "1 {\"v\":\"1\",\"id\":1,\"method\":\"a\"}\n"));
  ASSERT_EQ(efd_readable(&b), 1);
  ASSERT_OK(put_py_str(&b, "2 {\"v\":\"1\",\"id\":2,\"method\":\"b\"}\n"));
  ASSERT_EQ(efd_readable(&b), 1);

  pa_buf_t out = {0};
  pa_bridge_take_py(&b, &out);
  static const char both[] = "1 {\"v\":\"1\",\"id\":1,\"method\":\"a\"}\n2 {\"v\":\"1\",\"id\":2,\"method\":\"b\"}\n";
  ASSERT_UINT64_EQ(out.len, sizeof both - 1);
  ASSERT_MEM_EQ(out.data, both, out.len);
  /* Taken means cleared: no wakeup pending, nothing left, no lag. */
  ASSERT_EQ(efd_readable(&b), 0);
  ASSERT_UINT64_EQ(b.to_py.len, 0);
  ASSERT_UINT64_EQ(pa_bridge_py_lag_ms(&b), 0);

  /* A second take with nothing queued gives nothing (out was freed first, as the header asks). */
  pa_buf_free(&out);
  pa_bridge_take_py(&b, &out);
  ASSERT_UINT64_EQ(out.len, 0);
  ASSERT_EQ(efd_readable(&b), 0);

  /* The next batch wakes Python again. */
  ASSERT_OK(put_py_str(&b, "3 {}\n"));
  ASSERT_EQ(efd_readable(&b), 1);
  pa_buf_free(&out);
  pa_bridge_take_py(&b, &out);
  ASSERT_UINT64_EQ(out.len, 5);
  ASSERT_MEM_EQ(out.data, "3 {}\n", 5);
  ASSERT_EQ(efd_readable(&b), 0);

  pa_buf_free(&out);
  pa_bridge_free(&b);
  ASSERT_EQ(b.efd, -1);
  return 0;
}

TEST_IMPL(bridge_put_take_c) {
  pa_bridge_t b;
  ASSERT_OK(pa_bridge_init(&b, 1 << 20));
  /* No libuv thread (wake_c NULL): queuing still works, nothing is woken. */
  ASSERT_OK(pa_bridge_put_c(&b, "0 {\"a\":1}\n", 10));
  ASSERT_OK(pa_bridge_put_c(&b, "0 {\"b\":2}\n", 10));
  /* C-bound lines never touch Python's eventfd. */
  ASSERT_EQ(efd_readable(&b), 0);
  pa_buf_t out = {0};
  pa_bridge_take_c(&b, &out);
  ASSERT_UINT64_EQ(out.len, 20);
  ASSERT_MEM_EQ(out.data, "0 {\"a\":1}\n0 {\"b\":2}\n", 20);
  ASSERT_UINT64_EQ(b.to_c.len, 0);
  pa_buf_free(&out);
  pa_bridge_take_c(&b, &out);
  ASSERT_UINT64_EQ(out.len, 0);
  pa_buf_free(&out);
  pa_bridge_free(&b);
  return 0;
}

/* ---- put_c from another thread wakes the loop ------------------------------------------------------------------- */

#define WAKE_LINES 200
#define WAKE_LINE "7 {\"v\":\"1\",\"method\":\"x\"}\n"

typedef struct wake_ctx_s {
  pa_bridge_t bridge;
  uv_async_t async;
  uv_timer_t deadline;
  pa_buf_t got;
  int wakeups;
  int timed_out;
} wake_ctx_t;

static void stop_waking(wake_ctx_t *w) {
  /* As the worker does: clear wake_c under the lock before closing the handle, so put_c never wakes a closed one. */
  uv_mutex_lock(&w->bridge.lock);
  w->bridge.wake_c = NULL;
  uv_mutex_unlock(&w->bridge.lock);
  uv_close((uv_handle_t *)&w->async, NULL);
  uv_close((uv_handle_t *)&w->deadline, NULL);
}

static void on_wake(uv_async_t *h) {
  wake_ctx_t *w = h->data;
  pa_buf_t batch = {0};
  w->wakeups++;
  pa_bridge_take_c(&w->bridge, &batch);
  if (batch.len) ASSERT_OK(pa_buf_append(&w->got, batch.data, batch.len));
  pa_buf_free(&batch);
  if (w->got.len == WAKE_LINES * (sizeof WAKE_LINE - 1)) stop_waking(w);
}

static void on_deadline(uv_timer_t *t) {
  wake_ctx_t *w = t->data;
  w->timed_out = 1;
  stop_waking(w);
}

static void python_thread(void *arg) {
  wake_ctx_t *w = arg;
  for (int i = 0; i < WAKE_LINES; i++) ASSERT_OK(pa_bridge_put_c(&w->bridge, WAKE_LINE, sizeof WAKE_LINE - 1));
}

TEST_IMPL(bridge_put_c_wakes_loop) {
  uv_loop_t loop;
  wake_ctx_t w;
  memset(&w, 0, sizeof w);
  ASSERT_OK(uv_loop_init(&loop));
  ASSERT_OK(pa_bridge_init(&w.bridge, 1 << 20));
  ASSERT_OK(uv_async_init(&loop, &w.async, on_wake));
  w.async.data = &w;
  ASSERT_OK(uv_timer_init(&loop, &w.deadline));
  w.deadline.data = &w;
  ASSERT_OK(uv_timer_start(&w.deadline, on_deadline, 5000, 0));
  uv_mutex_lock(&w.bridge.lock);
  w.bridge.wake_c = &w.async;
  uv_mutex_unlock(&w.bridge.lock);

  uv_thread_t thread;
  ASSERT_OK(uv_thread_create(&thread, python_thread, &w));
  ASSERT_OK(uv_run(&loop, UV_RUN_DEFAULT));
  ASSERT_OK(uv_thread_join(&thread));

  ASSERT_EQ(w.timed_out, 0);
  ASSERT_GE(w.wakeups, 1);
  ASSERT_LE(w.wakeups, WAKE_LINES); /* wakeups coalesce; never more than one per put */
  ASSERT_UINT64_EQ(w.got.len, WAKE_LINES * (sizeof WAKE_LINE - 1));
  for (size_t off = 0; off < w.got.len; off += sizeof WAKE_LINE - 1)
    ASSERT_MEM_EQ(w.got.data + off, WAKE_LINE, sizeof WAKE_LINE - 1);

  pa_buf_free(&w.got);
  pa_bridge_free(&w.bridge);
  MAKE_VALGRIND_HAPPY(&loop);
  return 0;
}

TEST_IMPL(bridge_limit_drops) {
  pa_bridge_t b;
  ASSERT_OK(pa_bridge_init(&b, 16));
  /* A batch bigger than the whole limit, on an empty queue: dropped, counted, and Python is not woken for it. */
  ASSERT_EQ(put_py_str(&b, "1 0123456789abcdef\n"), -ENOBUFS);
  ASSERT_UINT64_EQ(b.dropped_to_py, 1);
  ASSERT_EQ(efd_readable(&b), 0);
  ASSERT_UINT64_EQ(pa_bridge_py_lag_ms(&b), 0);

  ASSERT_OK(put_py_str(&b, "1 aaaaaa\n"));               /* 9 bytes */
  ASSERT_EQ(put_py_str(&b, "1 bbbbbbbb\n"), -ENOBUFS);   /* 9 + 11 > 16: the whole batch goes, not a part */
  ASSERT_UINT64_EQ(b.dropped_to_py, 2);
  ASSERT_UINT64_EQ(b.to_py.len, 9);
  ASSERT_OK(put_py_str(&b, "1 cccc\n"));                 /* 9 + 7 == 16: exactly the limit fits */
  ASSERT_EQ(put_py_str(&b, "\n"), -ENOBUFS);             /* one byte more does not */
  ASSERT_UINT64_EQ(b.dropped_to_py, 3);

  pa_buf_t out = {0};
  pa_bridge_take_py(&b, &out);
  ASSERT_UINT64_EQ(out.len, 16);
  ASSERT_MEM_EQ(out.data, "1 aaaaaa\n1 cccc\n", 16);
  pa_buf_free(&out);

  /* Drained, the queue takes batches again; the drop count is a running total. */
  ASSERT_OK(put_py_str(&b, "1 bbbbbbbb\n"));
  ASSERT_UINT64_EQ(b.dropped_to_py, 3);
  ASSERT_EQ(efd_readable(&b), 1);
  pa_bridge_take_py(&b, &out);
  ASSERT_UINT64_EQ(out.len, 11);
  pa_buf_free(&out);
  pa_bridge_free(&b);
  return 0;
}

TEST_IMPL(bridge_py_lag) {
  pa_bridge_t b;
  ASSERT_OK(pa_bridge_init(&b, 1 << 20));
  ASSERT_UINT64_EQ(pa_bridge_py_lag_ms(&b), 0);
  ASSERT_OK(put_py_str(&b, "1 {}\n"));
  uv_sleep(30);
  uint64_t lag = pa_bridge_py_lag_ms(&b);
  ASSERT_UINT64_GE(lag, 30);
  ASSERT_UINT64_LT(lag, 10000);
  /* Lag counts from when the queue stopped being empty: a later put does not restart it. */
  ASSERT_OK(put_py_str(&b, "1 {}\n"));
  uv_sleep(10);
  ASSERT_UINT64_GE(pa_bridge_py_lag_ms(&b), 40);

  pa_buf_t out = {0};
  pa_bridge_take_py(&b, &out);
  ASSERT_UINT64_EQ(out.len, 10);
  ASSERT_UINT64_EQ(pa_bridge_py_lag_ms(&b), 0);
  pa_buf_free(&out);

  /* The next batch starts a fresh measurement: its lag is bounded by the time since it was put, not since the first. */
  uint64_t before = uv_hrtime();
  ASSERT_OK(put_py_str(&b, "1 {}\n"));
  lag = pa_bridge_py_lag_ms(&b);
  ASSERT_UINT64_LE(lag, (uv_hrtime() - before) / 1000000u);
  pa_bridge_take_py(&b, &out);
  pa_buf_free(&out);
  pa_bridge_free(&b);
  return 0;
}
