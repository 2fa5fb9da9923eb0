/* The libuv thread. One per process: started by `_pyagent_host.start`, stopped by `_pyagent_host.stop`.
 *
 * Routing: frames from an endpoint go to Python as "<session> <json>\n" (conn.c decides which); lines from Python
 * name the session to answer on, or 0 for "the healthiest session" (lowest heartbeat round trip). Lines for session 0
 * wait in a bounded outbox while no session is up and are flushed to the first session that comes up. */
#include "worker.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "crash.h"
#include "log.h"
#include "proto.h"

static pa_worker_t *pa__worker; /* the running worker, or NULL */

/* ---- to Python ---------------------------------------------------------------------------------------------------- */

void pa__worker_to_py(pa_worker_t *w, uint64_t session, const char *line, size_t len) {
  char prefix[32];
  int n = snprintf(prefix, sizeof prefix, "%llu ", (unsigned long long)session);
  if (pa_buf_append(&w->to_py, prefix, (size_t)n) || pa_buf_append(&w->to_py, line, len) ||
      pa_buf_append(&w->to_py, "\n", 1))
    pa_log(PA_LOG_ERROR, "bridge.dropped", "reason=\"out of memory\"");
}

void pa__worker_flush_py(pa_worker_t *w) {
  if (w->to_py.len == 0) return;
  if (pa_bridge_put_py(w->bridge, w->to_py.data, w->to_py.len))
    pa_log(PA_LOG_ERROR, "bridge.dropped", "bytes=%zu reason=\"the Python runtime is not draining its queue\"",
           w->to_py.len);
  w->to_py.len = 0;
}

static void session_notice(pa_worker_t *w, pa_conn_t *c, const char *state, const char *reason) {
  json_t *params = json_pack("{s:I, s:s, s:s}", "session", (json_int_t)c->session, "state", state, "endpoint", c->label);
  if (params && reason) json_object_set_new(params, "reason", json_string(reason));
  json_t *msg = json_pack("{s:s, s:s, s:o}", "v", PA_PROTO_VERSION, "method", "host.session", "params", params);
  char *s = msg ? json_dumps(msg, JSON_COMPACT) : NULL;
  if (s) pa__worker_to_py(w, c->session, s, strlen(s));
  free(s);
  json_decref(msg);
}

void pa__worker_session_up(pa_worker_t *w, pa_conn_t *c) {
  c->session = ++w->next_session;
  session_notice(w, c, "up", NULL);
  if (w->outbox.len) {
    /* What waited for any session goes out on the first one up. */
    if (pa_conn_send(c, w->outbox.data, w->outbox.len) == 0) w->outbox.len = 0;
  }
}

void pa__worker_session_down(pa_worker_t *w, pa_conn_t *c, const char *reason) {
  session_notice(w, c, "down", reason);
  c->session = 0;
}

/* ---- from Python ---------------------------------------------------------------------------------------------------- */

static pa_conn_t *healthiest(pa_worker_t *w) {
  pa_conn_t *best = NULL;
  for (size_t i = 0; i < w->n_conns; i++) {
    pa_conn_t *c = &w->conns[i];
    if (c->state != PA_CONN_UP) continue;
    /* A session without a measured round trip yet ranks after every measured one. */
    double rtt = c->rtt_ms < 0 ? 1e12 : c->rtt_ms;
    double best_rtt = !best ? 1e18 : best->rtt_ms < 0 ? 1e12 : best->rtt_ms;
    if (rtt < best_rtt) best = c;
  }
  return best;
}

static pa_conn_t *by_session(pa_worker_t *w, uint64_t session) {
  for (size_t i = 0; i < w->n_conns; i++)
    if (w->conns[i].session == session && w->conns[i].state == PA_CONN_UP) return &w->conns[i];
  return NULL;
}

static void route_from_py(pa_worker_t *w, const char *data, size_t len) {
  const char *p = data, *end = data + len;
  while (p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl) {
      pa_log(PA_LOG_ERROR, "bridge.dropped", "reason=\"incomplete line from the runtime\" bytes=%zu", (size_t)(end - p));
      return;
    }
    char *after;
    unsigned long long session = strtoull(p, &after, 10);
    if (after == p || after >= nl || *after != ' ') {
      pa_log(PA_LOG_ERROR, "bridge.dropped", "reason=\"line from the runtime without a session prefix\"");
    } else {
      const char *line = after + 1;
      size_t n = (size_t)(nl + 1 - line); /* keeps the '\n' */
      pa_conn_t *c = session ? by_session(w, session) : healthiest(w);
      if (c) {
        pa_conn_send(c, line, n);
      } else if (session == 0) {
        if (w->outbox.len + n <= w->cfg.outbox_bytes) pa_buf_append(&w->outbox, line, n);
        else if (w->outbox_dropped++ % 1000 == 0)
          pa_log(PA_LOG_WARNING, "outbox.full", "limit_bytes=%zu dropped=%llu", w->cfg.outbox_bytes,
                 (unsigned long long)w->outbox_dropped);
      } else {
        /* The session a request came on is gone; the endpoint has failed that request already. */
        w->dropped_no_session++;
        pa_log(PA_LOG_DEBUG, "reply.dropped", "session=%llu reason=\"session closed\"", session);
      }
    }
    p = nl + 1;
  }
}

static void stop_all(pa_worker_t *w);

static void on_wake(uv_async_t *a) {
  pa_worker_t *w = a->data;
  pa_buf_t batch = {0};
  pa_bridge_take_c(w->bridge, &batch);
  if (batch.len) route_from_py(w, batch.data, batch.len);
  pa_buf_free(&batch);
  for (size_t i = 0; i < w->n_conns; i++) pa_conn_flush(&w->conns[i]);
  if (w->stop_requested && !w->stopping) stop_all(w);
  pa__worker_flush_py(w);
}

/* ---- start and stop --------------------------------------------------------------------------------------------- */

static void maybe_finish(pa_worker_t *w) {
  if (w->finished) return;
  for (size_t i = 0; i < w->n_conns; i++)
    if (!pa_conn_stopped(&w->conns[i])) return;
  /* Every connection is closed: close the remaining handles and let uv_run return. */
  w->finished = 1;
  for (size_t i = 0; i < w->n_conns; i++) {
    uv_close((uv_handle_t *)&w->conns[i].timer, NULL);
    uv_close((uv_handle_t *)&w->conns[i].tick, NULL);
  }
  uv_mutex_lock(&w->bridge->lock);
  w->bridge->wake_c = NULL;
  uv_mutex_unlock(&w->bridge->lock);
  uv_close((uv_handle_t *)&w->wake, NULL);
}

void pa__worker_conn_closed(pa_worker_t *w, pa_conn_t *c) {
  (void)c;
  if (w->stopping) maybe_finish(w);
}

static void stop_all(pa_worker_t *w) {
  w->stopping = 1;
  pa_log(PA_LOG_INFO, "host.stopping", "sessions=%zu", w->n_conns);
  for (size_t i = 0; i < w->n_conns; i++) pa_conn_stop(&w->conns[i]);
  maybe_finish(w);
}

static void run_loop(void *arg) {
  pa_worker_t *w = arg;
  /* This thread's own signal stack, so that a stack overflow here still reaches the crash handler (crash.c). */
  if (pa_crash_thread_enter(&w->loop)) pa_log(PA_LOG_WARNING, "crash.altstack_failed", "thread=libuv");
  for (size_t i = 0; i < w->n_conns; i++) pa_conn_start(&w->conns[i]);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  pa_crash_thread_leave();
  pa__worker_flush_py(w);
}

static void worker_free(pa_worker_t *w) {
  if (uv_loop_close(&w->loop) == UV_EBUSY) pa_log(PA_LOG_ERROR, "host.leak", "reason=\"handles left open at stop\"");
  for (size_t i = 0; i < w->n_conns; i++)
    if (w->conns[i].addrs) uv_freeaddrinfo(w->conns[i].addrs);
  free(w->conns);
  pa_buf_free(&w->to_py);
  pa_buf_free(&w->outbox);
  pa_tls_ctx_free(&w->tls_ctx);
  pa_host_cfg_free(&w->cfg);
  uv_mutex_destroy(&w->stats_lock);
  free(w);
}

int pa_worker_running(void) { return pa__worker != NULL; }

int pa_worker_start(const char *config_json, size_t len, pa_bridge_t *bridge, char *err, size_t errlen) {
  if (pa__worker) {
    snprintf(err, errlen, "the host is already started");
    return -EALREADY;
  }
  pa_worker_t *w = calloc(1, sizeof *w);
  if (!w) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  if (pa_host_cfg_parse(&w->cfg, config_json, len, err, errlen)) {
    free(w);
    return -EINVAL;
  }
  pa_log_set_level(w->cfg.log_level);
  if (pa_tls_ctx_init(&w->tls_ctx, w->cfg.ca_file, w->cfg.cert_file, w->cfg.key_file, err, errlen)) {
    pa_host_cfg_free(&w->cfg);
    free(w);
    return -EINVAL;
  }
  uv_mutex_init(&w->stats_lock);
  uv_loop_init(&w->loop);
  w->bridge = bridge;
  uv_async_init(&w->loop, &w->wake, on_wake);
  w->wake.data = w;
  w->n_conns = w->cfg.n_endpoints;
  w->conns = calloc(w->n_conns, sizeof *w->conns);
  if (!w->conns) {
    snprintf(err, errlen, "out of memory");
    uv_close((uv_handle_t *)&w->wake, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    worker_free(w);
    return -ENOMEM;
  }
  for (size_t i = 0; i < w->n_conns; i++) {
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != sizeof seed) seed = uv_hrtime() ^ (uint64_t)i;
    pa_conn_init(&w->conns[i], w, &w->cfg.endpoints[i], seed);
  }
  uv_mutex_lock(&bridge->lock);
  bridge->wake_c = &w->wake;
  uv_mutex_unlock(&bridge->lock);

  /* The Python main thread owns the signals: the libuv thread blocks all of them except the synchronous faults, which
   * must stay deliverable to the crash handler on the thread that faulted. */
  sigset_t all, old;
  sigfillset(&all);
  int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS};
  for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) sigdelset(&all, faults[i]);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  int rc = uv_thread_create(&w->thread, run_loop, w);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc) {
    snprintf(err, errlen, "cannot start the libuv thread: %s", uv_strerror(rc));
    uv_mutex_lock(&bridge->lock);
    bridge->wake_c = NULL;
    uv_mutex_unlock(&bridge->lock);
    for (size_t i = 0; i < w->n_conns; i++) {
      uv_close((uv_handle_t *)&w->conns[i].timer, NULL);
      uv_close((uv_handle_t *)&w->conns[i].tick, NULL);
    }
    uv_close((uv_handle_t *)&w->wake, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    worker_free(w);
    return rc;
  }
  pa__worker = w;
  pa_log(PA_LOG_INFO, "host.started", "version=%s endpoints=%zu", PA_HOST_VERSION, w->n_conns);
  return 0;
}

int pa_worker_stop(unsigned timeout_ms) {
  pa_worker_t *w = pa__worker;
  if (!w) return 0;
  w->stop_requested = 1;
  uv_mutex_lock(&w->bridge->lock);
  if (w->bridge->wake_c) uv_async_send(w->bridge->wake_c);
  uv_mutex_unlock(&w->bridge->lock);
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_ms / 1000;
  deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  int rc = pthread_timedjoin_np(w->thread, NULL, &deadline);
  if (rc) {
    pa_log(PA_LOG_ERROR, "host.stop_timeout", "timeout_ms=%u", timeout_ms);
    return -ETIMEDOUT;
  }
  pa__worker = NULL;
  worker_free(w);
  pa_log(PA_LOG_INFO, "host.stopped", "clean=1");
  return 0;
}

json_t *pa_worker_stats(void) {
  pa_worker_t *w = pa__worker;
  json_t *sessions = json_array();
  if (!w) return json_pack("{s:b, s:o}", "running", 0, "sessions", sessions);
  uv_mutex_lock(&w->stats_lock);
  for (size_t i = 0; i < w->n_conns; i++) {
    pa_conn_t *c = &w->conns[i];
    json_array_append_new(
        sessions, json_pack("{s:s, s:s, s:I, s:o, s:o, s:I, s:s}", "endpoint", c->label, "state",
                            pa_conn_state_name(c->state), "session", (json_int_t)c->session, "rtt_ms",
                            c->rtt_ms >= 0 ? json_real(c->rtt_ms) : json_null(), "skew_ms",
                            c->rtt_ms >= 0 ? json_real(c->skew_ms) : json_null(), "connects",
                            (json_int_t)c->connects, "last_error", c->last_error));
  }
  uv_mutex_unlock(&w->stats_lock);
  return json_pack("{s:b, s:o, s:I, s:I, s:I}", "running", 1, "sessions", sessions, "py_lag_ms",
                   (json_int_t)pa_bridge_py_lag_ms(w->bridge), "outbox_dropped", (json_int_t)w->outbox_dropped,
                   "dropped_to_py", (json_int_t)w->bridge->dropped_to_py);
}
