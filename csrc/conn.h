/* One endpoint connection and its whole life: resolve, connect, TLS, hello, heartbeats, idle timeout, reconnect with
 * backoff. A conn is a long-lived handle owned by the worker; it keeps reconnecting until the worker stops. */
#ifndef PA_CONN_H
#define PA_CONN_H

#include <stdint.h>

#include <uv.h>

#include "backoff.h"
#include "frame.h"
#include "hostcfg.h"
#include "tls.h"

struct pa_worker_s;

typedef enum {
  PA_CONN_IDLE,        /* waiting for the reconnect timer */
  PA_CONN_RESOLVING,
  PA_CONN_CONNECTING,
  PA_CONN_TLS,
  PA_CONN_HELLO,       /* hello sent, waiting for its result */
  PA_CONN_UP,          /* session established: application traffic flows */
  PA_CONN_CLOSING,
  PA_CONN_STOPPED
} pa_conn_state_t;

typedef struct pa_conn_s {
  struct pa_worker_s *w;
  const pa_endpoint_cfg_t *ep;
  char label[300]; /* "host:port" for logs */
  pa_conn_state_t state;

  uv_tcp_t tcp;
  int tcp_active;       /* tcp initialised and not yet closed */
  uv_timer_t timer;     /* reconnect delay, handshake deadline, close deadline */
  uv_timer_t tick;      /* heartbeats and idle timeout while up */
  uv_getaddrinfo_t gai;
  struct addrinfo *addrs;
  struct addrinfo *addr_next;
  uv_connect_t connect_req;
  uv_shutdown_t shutdown_req;

  pa_tls_t tls;
  pa_framer_t framer;
  pa_backoff_t backoff;

  uint64_t session;      /* session id while up, 0 otherwise */
  int64_t next_id;       /* the host's own requests use negative ids */
  int64_t hello_id;
  uint64_t up_at;        /* uv_now() when the session came up */
  uint64_t last_rx;      /* uv_now() of the last frame */
  uint64_t next_hb_at;
  uint64_t interval_ms;  /* heartbeat interval from the hello result */
  int64_t hb_id;         /* outstanding heartbeat, 0 when none */
  double hb_sent_wall;
  uint64_t hb_sent_hr;
  uint64_t hb_seq;
  uint64_t hb_in_session; /* heartbeats sent in this session */
  double rtt_ms;         /* < 0 while unknown */
  double skew_ms;
  uint64_t retry_after_ms;
  int try_next_addr;
  uint64_t connects;     /* sessions established so far */
  char last_error[300];
  char rbuf[65536];
  char pbuf[65536];
} pa_conn_t;

void pa_conn_init(pa_conn_t *c, struct pa_worker_s *w, const pa_endpoint_cfg_t *ep, uint64_t seed);
/* Begin the first connection attempt now. */
void pa_conn_start(pa_conn_t *c);
/* Queue one complete line (with its '\n') on an established session. */
int pa_conn_send(pa_conn_t *c, const char *line, size_t len);
/* Push encrypted bytes to the socket. */
void pa_conn_flush(pa_conn_t *c);
/* Close for good (worker stopping): a goodbye to the endpoint, then every handle closed. */
void pa_conn_stop(pa_conn_t *c);
/* All of this conn's handles are closed. */
int pa_conn_stopped(const pa_conn_t *c);
const char *pa_conn_state_name(pa_conn_state_t s);

#endif
