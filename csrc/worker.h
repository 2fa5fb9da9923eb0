/* The libuv thread: owns the loop, the endpoint connections and the C side of the bridge. Python starts and stops it
 * through `_pyagent_host`; nothing here touches the Python C API. */
#ifndef PA_WORKER_H
#define PA_WORKER_H

#include <stdatomic.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#include "bridge.h"
#include "conn.h"
#include "hostcfg.h"

/* Overridden by the build (CMake cache variable PYAGENT_HOST_VERSION), e.g. to make a second host for tests. */
#ifndef PA_HOST_VERSION
#define PA_HOST_VERSION "0.1.0"
#endif

typedef struct pa_worker_s {
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t wake;
  pa_host_cfg_t cfg;
  pa_tls_ctx_t tls_ctx;
  pa_bridge_t *bridge;
  pa_conn_t *conns;
  size_t n_conns;
  uint64_t next_session;
  pa_buf_t to_py;         /* lines for Python gathered during one callback, handed over at its end */
  pa_buf_t outbox;        /* lines for "any session" while none is up */
  uint64_t outbox_dropped;
  uint64_t dropped_no_session;
  atomic_int stop_requested; /* set by the Python thread, read by the libuv thread */
  int stopping;
  int finished;           /* the last handles are closing */
  uv_mutex_t stats_lock;  /* guards what stats() reads from the Python thread: conn states, rtt, counters */
} pa_worker_t;

int pa_worker_start(const char *config_json, size_t len, pa_bridge_t *bridge, char *err, size_t errlen);
/* 0 when the thread ended within timeout_ms, -ETIMEDOUT otherwise. */
int pa_worker_stop(unsigned timeout_ms);
int pa_worker_running(void);
/* A snapshot for `_pyagent_host.stats()` (new reference). */
json_t *pa_worker_stats(void);

/* Used by conn.c. */
void pa__worker_to_py(pa_worker_t *w, uint64_t session, const char *line, size_t len);
void pa__worker_flush_py(pa_worker_t *w);
void pa__worker_session_up(pa_worker_t *w, pa_conn_t *c);
void pa__worker_session_down(pa_worker_t *w, pa_conn_t *c, const char *reason);
void pa__worker_conn_closed(pa_worker_t *w, pa_conn_t *c);

#endif
