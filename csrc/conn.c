/* One endpoint connection. The state machine runs on the libuv thread only:
 *
 *   IDLE -timer-> RESOLVING -> CONNECTING -> TLS -> HELLO -> UP
 *     ^                                                        |
 *     +------------- close callback (backoff) <- CLOSING <-----+  (any failure, from any state after IDLE)
 *
 * Every failure goes through conn_fail(), which logs the reason once, tells Python if a session was up, and closes the
 * socket; the close callback is the single place that frees the session and schedules the next attempt. */
#include "conn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "proto.h"
#include "worker.h"

#define WRITE_QUEUE_LIMIT (64u << 20) /* an endpoint that stops reading is dropped past this */
#define CLOSE_DEADLINE_MS 2000

static void on_timer(uv_timer_t *t);
static void on_tick(uv_timer_t *t);
static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res);
static void on_connect(uv_connect_t *req, int status);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void on_tcp_closed(uv_handle_t *h);
static void alloc_read(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void conn_fail(pa_conn_t *c, const char *reason);

const char *pa_conn_state_name(pa_conn_state_t s) {
  switch (s) {
    case PA_CONN_IDLE: return "idle";
    case PA_CONN_RESOLVING: return "resolving";
    case PA_CONN_CONNECTING: return "connecting";
    case PA_CONN_TLS: return "tls";
    case PA_CONN_HELLO: return "hello";
    case PA_CONN_UP: return "up";
    case PA_CONN_CLOSING: return "closing";
    case PA_CONN_STOPPED: return "stopped";
  }
  return "unknown";
}

static void set_state(pa_conn_t *c, pa_conn_state_t s) {
  uv_mutex_lock(&c->w->stats_lock);
  c->state = s;
  uv_mutex_unlock(&c->w->stats_lock);
}

void pa_conn_init(pa_conn_t *c, pa_worker_t *w, const pa_endpoint_cfg_t *ep, uint64_t seed) {
  memset(c, 0, sizeof *c);
  c->w = w;
  c->ep = ep;
  c->state = PA_CONN_IDLE;
  c->rtt_ms = -1;
  c->next_id = -1;
  if (strchr(ep->host, ':')) snprintf(c->label, sizeof c->label, "[%s]:%d", ep->host, ep->port);
  else snprintf(c->label, sizeof c->label, "%s:%d", ep->host, ep->port);
  pa_backoff_init(&c->backoff, w->cfg.reconnect_min_ms, w->cfg.reconnect_max_ms, seed);
  uv_timer_init(&w->loop, &c->timer);
  uv_timer_init(&w->loop, &c->tick);
  c->timer.data = c;
  c->tick.data = c;
}

/* ---- writing ---------------------------------------------------------------------------------------------------- */

typedef struct {
  uv_write_t req;
  char data[];
} write_req_t;

static void on_written(uv_write_t *req, int status) {
  pa_conn_t *c = req->handle->data;
  free(req);
  if (status < 0 && status != UV_ECANCELED && c && c->state != PA_CONN_CLOSING && c->state != PA_CONN_STOPPED) {
    char why[200];
    snprintf(why, sizeof why, "write failed: %s", uv_strerror(status));
    conn_fail(c, why);
  }
}

void pa_conn_flush(pa_conn_t *c) {
  if (!c->tcp_active || !c->tls.ssl) return;
  size_t pending;
  while ((pending = pa_tls_out_pending(&c->tls)) > 0) {
    /* Try the socket directly first; only what the kernel does not take is copied for a queued write. */
    char stackbuf[65536];
    size_t n = pa_tls_out_take(&c->tls, stackbuf, sizeof stackbuf);
    if (n == 0) break;
    size_t off = 0;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0) {
      uv_buf_t b = uv_buf_init(stackbuf, (unsigned)n);
      int w = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
      if (w > 0) off = (size_t)w;
      else if (w < 0 && w != UV_EAGAIN) {
        char why[200];
        snprintf(why, sizeof why, "write failed: %s", uv_strerror(w));
        conn_fail(c, why);
        return;
      }
    }
    if (off == n) continue;
    write_req_t *wr = malloc(sizeof *wr + (n - off));
    if (!wr) {
      conn_fail(c, "out of memory queueing a write");
      return;
    }
    memcpy(wr->data, stackbuf + off, n - off);
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)(n - off));
    int rc = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
    if (rc < 0) {
      free(wr);
      char why[200];
      snprintf(why, sizeof why, "write failed: %s", uv_strerror(rc));
      conn_fail(c, why);
      return;
    }
  }
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > WRITE_QUEUE_LIMIT)
    conn_fail(c, "the endpoint is not reading (write queue over 64 MiB)");
}

int pa_conn_send(pa_conn_t *c, const char *line, size_t len) {
  if (c->state != PA_CONN_UP && c->state != PA_CONN_HELLO) return -1;
  if (pa_tls_write(&c->tls, line, len)) {
    conn_fail(c, pa_tls_error(&c->tls));
    return -1;
  }
  return 0;
}

/* Send a line built by proto.c and free it. */
static void send_owned(pa_conn_t *c, char *line) {
  if (!line) {
    conn_fail(c, "out of memory building a message");
    return;
  }
  if (pa_tls_write(&c->tls, line, strlen(line))) conn_fail(c, pa_tls_error(&c->tls));
  free(line);
}

/* ---- connecting --------------------------------------------------------------------------------------------------- */

static void schedule_attempt(pa_conn_t *c, uint64_t delay_ms) {
  set_state(c, PA_CONN_IDLE);
  uv_timer_start(&c->timer, on_timer, delay_ms, 0);
}

void pa_conn_start(pa_conn_t *c) { schedule_attempt(c, 0); }

static void connect_next(pa_conn_t *c) {
  struct addrinfo *ai = c->addr_next;
  c->addr_next = ai->ai_next;
  uv_tcp_init(&c->w->loop, &c->tcp);
  c->tcp.data = c;
  c->tcp_active = 1;
  set_state(c, PA_CONN_CONNECTING);
  uv_tcp_nodelay(&c->tcp, 1);
  int rc = uv_tcp_connect(&c->connect_req, &c->tcp, ai->ai_addr, on_connect);
  if (rc < 0) {
    char why[200];
    snprintf(why, sizeof why, "connect failed: %s", uv_strerror(rc));
    c->try_next_addr = c->addr_next != NULL;
    conn_fail(c, why);
  }
}

static void begin_attempt(pa_conn_t *c) {
  char port[16];
  snprintf(port, sizeof port, "%d", c->ep->port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG | AI_NUMERICSERV;
  set_state(c, PA_CONN_RESOLVING);
  c->gai.data = c;
  /* The handshake deadline covers connect, TLS and hello; resolution has the resolver's own timeouts. */
  int rc = uv_getaddrinfo(&c->w->loop, &c->gai, on_resolved, c->ep->host, port, &hints);
  if (rc < 0) {
    snprintf(c->last_error, sizeof c->last_error, "cannot resolve %s: %s", c->ep->host, uv_strerror(rc));
    pa_log(PA_LOG_WARNING, "connect.failed", "endpoint=%s reason=\"%s\"", c->label, c->last_error);
    schedule_attempt(c, pa_backoff_next(&c->backoff));
  }
}

static void on_timer(uv_timer_t *t) {
  pa_conn_t *c = t->data;
  if (c->w->stopping) return;
  switch (c->state) {
    case PA_CONN_IDLE:
      begin_attempt(c);
      break;
    case PA_CONN_CONNECTING:
    case PA_CONN_TLS:
    case PA_CONN_HELLO: {
      char why[200];
      snprintf(why, sizeof why, "handshake deadline: no session after %llu ms (stuck in %s)",
               (unsigned long long)c->w->cfg.handshake_timeout_ms, pa_conn_state_name(c->state));
      conn_fail(c, why);
      break;
    }
    case PA_CONN_CLOSING:
      /* A graceful close did not finish: stop waiting for the peer. */
      if (c->tcp_active && !uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
      break;
    default:
      break;
  }
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  pa_conn_t *c = req->data;
  if (c->w->stopping || status == UV_ECANCELED) {
    if (res) uv_freeaddrinfo(res);
    if (c->w->stopping) {
      set_state(c, PA_CONN_STOPPED);
      pa__worker_conn_closed(c->w, c);
    }
    return;
  }
  if (status < 0 || !res) {
    snprintf(c->last_error, sizeof c->last_error, "cannot resolve %s: %s", c->ep->host, uv_strerror(status));
    pa_log(PA_LOG_WARNING, "connect.failed", "endpoint=%s reason=\"%s\"", c->label, c->last_error);
    schedule_attempt(c, pa_backoff_next(&c->backoff));
    return;
  }
  if (c->addrs) uv_freeaddrinfo(c->addrs);
  c->addrs = res;
  c->addr_next = res;
  uv_timer_start(&c->timer, on_timer, c->w->cfg.handshake_timeout_ms, 0);
  connect_next(c);
}

static void send_hello(pa_conn_t *c) {
  json_t *params = json_deep_copy(c->w->cfg.hello);
  if (params && c->w->cfg.token) json_object_set_new(params, "token", json_string(c->w->cfg.token));
  c->hello_id = c->next_id--;
  set_state(c, PA_CONN_HELLO);
  send_owned(c, pa_proto_request_line(c->hello_id, "handshake.hello", params));
}

static void on_connect(uv_connect_t *req, int status) {
  pa_conn_t *c = req->handle->data;
  if (status == UV_ECANCELED || c->state != PA_CONN_CONNECTING) return;
  if (status < 0) {
    char why[200];
    snprintf(why, sizeof why, "connect failed: %s", uv_strerror(status));
    c->try_next_addr = c->addr_next != NULL;
    conn_fail(c, why);
    return;
  }
  pa_framer_init(&c->framer, c->w->cfg.max_frame_bytes);
  if (pa_tls_init(&c->tls, &c->w->tls_ctx, c->ep->server_name)) {
    conn_fail(c, pa_tls_error(&c->tls));
    return;
  }
  set_state(c, PA_CONN_TLS);
  uv_read_start((uv_stream_t *)&c->tcp, alloc_read, on_read);
  if (pa_tls_handshake(&c->tls) == PA_TLS_EFAIL) {
    conn_fail(c, pa_tls_error(&c->tls));
    return;
  }
  pa_conn_flush(c);
}

/* ---- heartbeats -------------------------------------------------------------------------------------------------- */

static void send_heartbeat(pa_conn_t *c) {
  json_t *params = json_pack("{s:f, s:I, s:o, s:o, s:I}", "timestamp", pa_wall_ms(), "seq", (json_int_t)++c->hb_seq,
                             "rtt_ms", c->rtt_ms >= 0 ? json_real(c->rtt_ms) : json_null(), "skew_ms",
                             c->rtt_ms >= 0 ? json_real(c->skew_ms) : json_null(), "py_lag_ms",
                             (json_int_t)pa_bridge_py_lag_ms(c->w->bridge));
  c->hb_id = c->next_id--;
  c->hb_in_session++;
  c->hb_sent_wall = pa_wall_ms();
  c->hb_sent_hr = uv_hrtime();
  send_owned(c, pa_proto_request_line(c->hb_id, "heartbeat.post", params));
}

static uint64_t jittered_interval(pa_conn_t *c) {
  /* +-10 %, from the conn's own generator, so heartbeats of many agents do not line up. */
  return (uint64_t)((double)c->interval_ms * (0.9 + 0.2 * pa_backoff_unit(&c->backoff)));
}

static void on_tick(uv_timer_t *t) {
  pa_conn_t *c = t->data;
  if (c->state != PA_CONN_UP) return;
  uint64_t now = uv_now(&c->w->loop);
  uint64_t idle_limit = c->interval_ms + c->interval_ms / 2;
  if (now - c->last_rx > idle_limit) {
    char why[200];
    snprintf(why, sizeof why, "idle timeout: nothing received for %llu ms (limit %llu ms)",
             (unsigned long long)(now - c->last_rx), (unsigned long long)idle_limit);
    conn_fail(c, why);
    return;
  }
  if (now >= c->next_hb_at) {
    send_heartbeat(c);
    c->next_hb_at = now + jittered_interval(c);
    pa_conn_flush(c);
  }
}

static void heartbeat_result(pa_conn_t *c, json_t *result) {
  double rtt = (double)(uv_hrtime() - c->hb_sent_hr) / 1e6;
  json_t *ts = json_object_get(result, "timestamp");
  uv_mutex_lock(&c->w->stats_lock);
  c->rtt_ms = rtt;
  if (json_is_number(ts)) c->skew_ms = json_number_value(ts) - (c->hb_sent_wall + rtt / 2);
  uv_mutex_unlock(&c->w->stats_lock);
  c->hb_id = 0;
  pa_log(PA_LOG_DEBUG, "heartbeat.ok", "endpoint=%s rtt_ms=%.3f skew_ms=%.1f", c->label, c->rtt_ms, c->skew_ms);
  /* A heartbeat reports the round trip measured by the one before it, so the first of a session carries none: send
   * the second at once, and the endpoint knows the latency within milliseconds instead of one interval later. */
  if (c->hb_in_session == 1) send_heartbeat(c);
}

/* ---- receiving -------------------------------------------------------------------------------------------------- */

static void refuse_frame(pa_conn_t *c, int code, const char *why) {
  char reason[400];
  snprintf(reason, sizeof reason, "protocol violation from the endpoint (code %d): %s", code, why);
  json_t *data = code == PA_ERR_FRAME_TOO_LARGE ? json_pack("{s:I}", "limit", (json_int_t)c->w->cfg.max_frame_bytes)
               : code == PA_ERR_VERSION_MISMATCH ? json_pack("{s:[s]}", "supported", PA_PROTO_VERSION)
                                                 : NULL;
  char *line = pa_proto_error_line(NULL, code, why, data);
  if (line) {
    pa_tls_write(&c->tls, line, strlen(line));
    free(line);
  }
  conn_fail(c, reason);
}

static void hello_result(pa_conn_t *c, pa_msg_t *m) {
  if (m->error) {
    json_t *code = json_object_get(m->error, "code");
    json_t *msg = json_object_get(m->error, "message");
    json_t *ra = json_object_get(json_object_get(m->error, "data"), "retry_after");
    if (json_is_number(ra) && json_number_value(ra) > 0) c->retry_after_ms = (uint64_t)(json_number_value(ra) * 1000);
    char why[300];
    snprintf(why, sizeof why, "handshake refused by the endpoint (code %lld): %s",
             json_is_number(code) ? (long long)json_number_value(code) : 0LL,
             json_is_string(msg) ? json_string_value(msg) : "no message");
    conn_fail(c, why);
    return;
  }
  json_t *iv = json_object_get(m->result, "heartbeat_interval");
  if (!json_is_number(iv) || json_number_value(iv) <= 0) {
    conn_fail(c, "handshake result has no positive 'heartbeat_interval'");
    return;
  }
  double ms = json_number_value(iv) * 1000.0;
  c->interval_ms = ms < 50 ? 50 : ms > 86400000.0 ? 86400000 : (uint64_t)ms;
  uv_timer_stop(&c->timer); /* the handshake deadline */
  uv_mutex_lock(&c->w->stats_lock);
  c->state = PA_CONN_UP;
  c->connects++;
  c->last_error[0] = '\0';
  uv_mutex_unlock(&c->w->stats_lock);
  c->up_at = uv_now(&c->w->loop);
  c->hb_in_session = 0;
  pa__worker_session_up(c->w, c);
  pa_log(PA_LOG_INFO, "session.up", "endpoint=%s session=%llu tls=%s heartbeat_interval_ms=%llu", c->label,
         (unsigned long long)c->session, pa_tls_version(&c->tls), (unsigned long long)c->interval_ms);
  /* First heartbeat now, so latency is known at once; then every interval. */
  send_heartbeat(c);
  c->next_hb_at = c->up_at + jittered_interval(c);
  uint64_t period = c->interval_ms / 4;
  if (period > 1000) period = 1000;
  if (period < 20) period = 20;
  uv_timer_start(&c->tick, on_tick, period, period);
}

static int on_frame(void *ctx, const char *line, size_t len) {
  pa_conn_t *c = ctx;
  c->last_rx = uv_now(&c->w->loop);
  pa_msg_t m;
  char why[300];
  int code = pa_msg_parse(&m, line, len, why, sizeof why);
  if (code) {
    refuse_frame(c, code, why);
    return 1;
  }
  if (m.kind == PA_MSG_RESPONSE && m.id_null) {
    /* The endpoint refused something we sent and is closing: say what it said, do not answer. */
    json_t *ecode = json_object_get(m.error, "code"), *emsg = json_object_get(m.error, "message");
    snprintf(why, sizeof why, "the endpoint reported a protocol error (code %lld): %s",
             json_is_number(ecode) ? (long long)json_number_value(ecode) : 0LL,
             json_is_string(emsg) ? json_string_value(emsg) : "no message");
    pa_msg_free(&m);
    conn_fail(c, why);
    return 1;
  } else if (m.kind == PA_MSG_RESPONSE && m.id < 0) {
    /* One of the host's own requests. */
    if (c->state == PA_CONN_HELLO && m.id == c->hello_id) hello_result(c, &m);
    else if (m.id == c->hb_id && m.result) heartbeat_result(c, m.result);
    else if (m.id == c->hb_id) pa_log(PA_LOG_WARNING, "heartbeat.refused", "endpoint=%s", c->label);
  } else if (m.kind != PA_MSG_RESPONSE && strcmp(m.method, "heartbeat.post") == 0) {
    if (m.kind == PA_MSG_REQUEST) send_owned(c, pa_proto_result_line(m.id, json_pack("{s:f}", "timestamp", pa_wall_ms())));
  } else if (m.kind != PA_MSG_RESPONSE && strncmp(m.method, "host.", 5) == 0) {
    if (m.kind == PA_MSG_REQUEST)
      send_owned(c, pa_proto_error_line(&m.id, PA_ERR_METHOD_NOT_FOUND, "host.* methods are internal to the agent",
                                        NULL));
  } else if (c->state == PA_CONN_UP) {
    pa__worker_to_py(c->w, c->session, line, len);
  } else {
    pa_log(PA_LOG_WARNING, "frame.dropped", "endpoint=%s reason=\"message before the handshake completed\"",
           c->label);
  }
  pa_msg_free(&m);
  return c->state == PA_CONN_CLOSING ? 1 : 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  pa_conn_t *c = s->data;
  (void)buf;
  if (c->state == PA_CONN_CLOSING || c->state == PA_CONN_STOPPED) return;
  if (nread < 0) {
    char why[200];
    if (nread == UV_EOF) snprintf(why, sizeof why, "connection closed by the endpoint");
    else snprintf(why, sizeof why, "read failed: %s", uv_strerror((int)nread));
    conn_fail(c, why);
    return;
  }
  if (nread == 0) return;
  if (pa_tls_feed(&c->tls, c->rbuf, (size_t)nread)) {
    conn_fail(c, pa_tls_error(&c->tls));
    return;
  }
  if (c->state == PA_CONN_TLS) {
    int rc = pa_tls_handshake(&c->tls);
    if (rc == PA_TLS_EFAIL) {
      conn_fail(c, pa_tls_error(&c->tls));
      return;
    }
    if (rc == 0) {
      pa_log(PA_LOG_DEBUG, "tls.established", "endpoint=%s version=%s", c->label, pa_tls_version(&c->tls));
      send_hello(c);
    }
  }
  while (c->tls.established && (c->state == PA_CONN_HELLO || c->state == PA_CONN_UP)) {
    int n = pa_tls_read(&c->tls, c->pbuf, sizeof c->pbuf);
    if (n == 0) break;
    if (n < 0) {
      conn_fail(c, n == PA_TLS_ECLOSED ? "the endpoint closed the TLS session" : pa_tls_error(&c->tls));
      break;
    }
    int rc = pa_framer_feed(&c->framer, c->pbuf, (size_t)n, on_frame, c);
    if (rc == PA_EFRAME_TOO_LARGE) {
      char why[200];
      snprintf(why, sizeof why, "frame longer than the limit of %zu bytes", c->w->cfg.max_frame_bytes);
      refuse_frame(c, PA_ERR_FRAME_TOO_LARGE, why);
      break;
    }
    if (rc) break;
  }
  pa_conn_flush(c);
  pa__worker_flush_py(c->w);
}

static void alloc_read(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  pa_conn_t *c = h->data;
  (void)suggested;
  *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

/* ---- closing ---------------------------------------------------------------------------------------------------- */

static void on_shutdown(uv_shutdown_t *req, int status) {
  pa_conn_t *c = req->data;
  (void)status;
  if (c->tcp_active && !uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
}

/* Flush what is queued (an error message, close_notify), then close: uv_shutdown waits for queued writes, the close
 * deadline stops the wait for a peer that does not read. */
static void close_gracefully(pa_conn_t *c) {
  set_state(c, PA_CONN_CLOSING);
  uv_timer_stop(&c->tick);
  uv_read_stop((uv_stream_t *)&c->tcp);
  if (c->tls.ssl) {
    pa_tls_shutdown(&c->tls);
    pa_conn_flush(c);
  }
  c->shutdown_req.data = c;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
    return;
  }
  uv_timer_start(&c->timer, on_timer, CLOSE_DEADLINE_MS, 0);
}

static void conn_fail(pa_conn_t *c, const char *reason) {
  if (c->state == PA_CONN_CLOSING || c->state == PA_CONN_STOPPED) return;
  int was_up = c->state == PA_CONN_UP;
  uv_mutex_lock(&c->w->stats_lock);
  snprintf(c->last_error, sizeof c->last_error, "%s", reason);
  uv_mutex_unlock(&c->w->stats_lock);
  if (!c->try_next_addr)
    pa_log(PA_LOG_WARNING, was_up ? "session.down" : "connect.failed",
           "endpoint=%s reason=\"%s\"", c->label, reason);
  if (was_up) pa__worker_session_down(c->w, c, reason);
  uv_timer_stop(&c->timer);
  if (!c->tcp_active) {
    schedule_attempt(c, pa_backoff_next(&c->backoff));
    return;
  }
  if (c->state == PA_CONN_CONNECTING || !c->tls.ssl) {
    set_state(c, PA_CONN_CLOSING);
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
    return;
  }
  close_gracefully(c);
}

static void on_tcp_closed(uv_handle_t *h) {
  pa_conn_t *c = h->data;
  c->tcp_active = 0;
  uv_timer_stop(&c->timer);
  pa_tls_free(&c->tls);
  pa_framer_free(&c->framer);
  c->hb_id = 0;
  if (c->w->stopping) {
    set_state(c, PA_CONN_STOPPED);
    pa__worker_conn_closed(c->w, c);
    return;
  }
  if (c->try_next_addr && c->addr_next) {
    c->try_next_addr = 0;
    uv_timer_start(&c->timer, on_timer, c->w->cfg.handshake_timeout_ms, 0);
    connect_next(c);
    return;
  }
  c->try_next_addr = 0;
  /* A session that lasted start again from the shortest delay; one that failed early keeps backing off. */
  if (c->up_at && uv_now(&c->w->loop) - c->up_at >= c->w->cfg.reconnect_stable_ms) pa_backoff_reset(&c->backoff);
  c->up_at = 0;
  uint64_t delay = pa_backoff_next(&c->backoff);
  if (c->retry_after_ms > delay) delay = c->retry_after_ms;
  c->retry_after_ms = 0;
  pa_log(PA_LOG_INFO, "reconnect.scheduled", "endpoint=%s delay_ms=%llu attempt=%u", c->label,
         (unsigned long long)delay, c->backoff.attempt);
  schedule_attempt(c, delay);
  pa__worker_flush_py(c->w);
}

void pa_conn_stop(pa_conn_t *c) {
  uv_timer_stop(&c->tick);
  switch (c->state) {
    case PA_CONN_IDLE:
      uv_timer_stop(&c->timer);
      set_state(c, PA_CONN_STOPPED);
      pa__worker_conn_closed(c->w, c);
      break;
    case PA_CONN_RESOLVING:
      uv_cancel((uv_req_t *)&c->gai); /* on_resolved sees stopping and finishes the stop */
      break;
    case PA_CONN_CONNECTING:
    case PA_CONN_TLS:
    case PA_CONN_HELLO:
    case PA_CONN_UP:
      if (c->state == PA_CONN_UP) pa__worker_session_down(c->w, c, "host stopping");
      if (c->state == PA_CONN_CONNECTING || !c->tls.ssl) {
        set_state(c, PA_CONN_CLOSING);
        uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
      } else {
        close_gracefully(c);
      }
      break;
    case PA_CONN_CLOSING: /* on_tcp_closed will see stopping */
    case PA_CONN_STOPPED:
      break;
  }
}

int pa_conn_stopped(const pa_conn_t *c) { return c->state == PA_CONN_STOPPED; }
