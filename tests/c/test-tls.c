/* The TLS client over memory BIOs (tls.h), against a real TLS server on 127.0.0.1: the pinned CA and the dialled name
 * are checked, TLS 1.2 is the floor, and application bytes round-trip. The certificates come from the ctest fixture
 * tls_certs (gen-certs.sh); PA_TEST_CERT_DIR names their directory.
 *
 * The server is a thread running plain OpenSSL on a blocking socket with receive/send timeouts, so it can never hang
 * the test; the client drives the pa_tls_* calls over a non-blocking socket with poll(), every wait bounded by a
 * deadline. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "frame.h"
#include "task.h"
#include "tls.h"

#define DEADLINE_MS 5000

/* The path of one of the fixture's files; each name has its own buffer, so the results stay valid. */
static const char *cert_path(const char *name) {
  static const char *const names[] = {"ca.pem", "other-ca.pem", "other-ca.key", "server.pem", "server.key"};
  static char paths[sizeof names / sizeof names[0]][1024];
  const char *dir = getenv("PA_TEST_CERT_DIR");
  if (!dir || !*dir)
    ASSERT_FAILED("%s", "PA_TEST_CERT_DIR is not set (run the TLS tests through ctest: its tls_certs fixture makes them)");
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    if (strcmp(names[i], name) != 0) continue;
    snprintf(paths[i], sizeof paths[i], "%s/%s", dir, name);
    if (access(paths[i], R_OK) != 0) ASSERT_FAILED("cannot read %s: %s", paths[i], strerror(errno));
    return paths[i];
  }
  ASSERT_FAILED("no fixture file named %s", name);
  return NULL;
}

static uint64_t deadline_after(uint64_t ms) { return uv_hrtime() / 1000000u + ms; }

static int ms_left(uint64_t deadline) {
  uint64_t now = uv_hrtime() / 1000000u;
  return now >= deadline ? 0 : (int)(deadline - now);
}

/* ---- the server ------------------------------------------------------------------------------------------------ */

typedef struct echo_server_s {
  SSL_CTX *ctx;
  int fd; /* listening */
  int port;
  uv_thread_t thread;
  /* Written by the server thread, read after the join. */
  int accepted;
  int handshake_ok;
  int version;
  int clean_close; /* the client sent close_notify */
  size_t echoed;
  char sni[256];
  char error[256];
} echo_server_t;

static void server_error(echo_server_t *s, const char *what) {
  char detail[200] = "no detail";
  unsigned long e = ERR_get_error();
  if (e) ERR_error_string_n(e, detail, sizeof detail);
  ERR_clear_error();
  snprintf(s->error, sizeof s->error, "%s: %s", what, detail);
}

/* One connection: handshake, then echo every byte until close_notify (answered with ours) or an error. */
static void server_thread(void *arg) {
  echo_server_t *s = arg;
  struct pollfd p = {.fd = s->fd, .events = POLLIN};
  if (poll(&p, 1, DEADLINE_MS) != 1) {
    snprintf(s->error, sizeof s->error, "no client connected");
    return;
  }
  int fd = accept(s->fd, NULL, NULL);
  if (fd < 0) {
    snprintf(s->error, sizeof s->error, "accept: %s", strerror(errno));
    return;
  }
  s->accepted = 1;
  struct timeval tv = {.tv_sec = DEADLINE_MS / 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  SSL *ssl = SSL_new(s->ctx);
  if (!ssl || SSL_set_fd(ssl, fd) != 1) {
    server_error(s, "SSL_new");
    goto done;
  }
  if (SSL_accept(ssl) != 1) {
    server_error(s, "SSL_accept");
    goto done;
  }
  s->handshake_ok = 1;
  s->version = SSL_version(ssl);
  const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  snprintf(s->sni, sizeof s->sni, "%s", sni ? sni : "");
  char buf[16384];
  for (;;) {
    int n = SSL_read(ssl, buf, sizeof buf);
    if (n <= 0) {
      if (SSL_get_error(ssl, n) == SSL_ERROR_ZERO_RETURN) {
        s->clean_close = 1;
        SSL_shutdown(ssl);
      } else {
        server_error(s, "SSL_read");
      }
      break;
    }
    if (SSL_write(ssl, buf, n) != n) {
      server_error(s, "SSL_write");
      break;
    }
    s->echoed += (size_t)n;
  }
done:
  if (ssl) SSL_free(ssl);
  close(fd);
  ERR_clear_error();
}

/* Listen on 127.0.0.1, port 0. max_version 0 means the library's default; anything else also lowers the security
 * level so that old protocol versions really are on offer. */
static void server_start(echo_server_t *s, int max_version) {
  memset(s, 0, sizeof *s);
  s->ctx = SSL_CTX_new(TLS_server_method());
  ASSERT_NOT_NULL(s->ctx);
  ASSERT_EQ(SSL_CTX_use_certificate_chain_file(s->ctx, cert_path("server.pem")), 1);
  ASSERT_EQ(SSL_CTX_use_PrivateKey_file(s->ctx, cert_path("server.key"), SSL_FILETYPE_PEM), 1);
  if (max_version) {
    SSL_CTX_set_security_level(s->ctx, 0);
    ASSERT_EQ(SSL_CTX_set_min_proto_version(s->ctx, TLS1_VERSION), 1);
    ASSERT_EQ(SSL_CTX_set_max_proto_version(s->ctx, max_version), 1);
    ASSERT_EQ(SSL_CTX_set_cipher_list(s->ctx, "DEFAULT:@SECLEVEL=0"), 1);
  }
  s->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(s->fd, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_OK(bind(s->fd, (struct sockaddr *)&addr, sizeof addr));
  ASSERT_OK(listen(s->fd, 1));
  socklen_t alen = sizeof addr;
  ASSERT_OK(getsockname(s->fd, (struct sockaddr *)&addr, &alen));
  s->port = ntohs(addr.sin_port);
  ASSERT_GT(s->port, 0);
  ASSERT_OK(uv_thread_create(&s->thread, server_thread, s));
}

/* Wait for the server thread (bounded: each of its waits is) and release everything. */
static void server_join(echo_server_t *s) {
  ASSERT_OK(uv_thread_join(&s->thread));
  close(s->fd);
  SSL_CTX_free(s->ctx);
  s->ctx = NULL;
}

/* ---- the client ------------------------------------------------------------------------------------------------ */

typedef struct client_s {
  int fd;
  pa_tls_ctx_t ctx;
  pa_tls_t tls;
  pa_framer_t framer;
  char out[16384]; /* ciphertext taken from the session, not yet sent */
  size_t out_len;
  size_t out_off;
  int eof;
  char *line; /* the last line the framer delivered */
  size_t line_len;
} client_t;

static int tcp_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_OK(connect(fd, (struct sockaddr *)&addr, sizeof addr)); /* the server is listening: immediate on loopback */
  return fd;
}

/* A client for `ca` that will check `server_name`, connected to the server's port. */
static void client_open(client_t *c, const char *ca, const char *server_name, int port) {
  memset(c, 0, sizeof *c);
  char err[512] = "";
  if (pa_tls_ctx_init(&c->ctx, ca, NULL, NULL, err, sizeof err)) ASSERT_FAILED("pa_tls_ctx_init: %s", err);
  ASSERT_OK(pa_tls_init(&c->tls, &c->ctx, server_name));
  pa_framer_init(&c->framer, 1 << 20);
  c->fd = tcp_connect(port);
  ASSERT_OK(fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK));
}

static void client_close(client_t *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  pa_tls_free(&c->tls);
  pa_tls_ctx_free(&c->ctx);
  pa_framer_free(&c->framer);
  free(c->line);
  c->line = NULL;
}

/* One round of socket I/O: send waiting ciphertext, and give OpenSSL whatever arrived. 0 after progress or EOF,
 * -ETIMEDOUT at the deadline, or a negative errno. */
static int client_io(client_t *c, uint64_t deadline) {
  if (c->out_off == c->out_len) {
    c->out_off = 0;
    c->out_len = pa_tls_out_take(&c->tls, c->out, sizeof c->out);
  }
  struct pollfd p = {.fd = c->fd, .events = (short)((c->eof ? 0 : POLLIN) | (c->out_len > c->out_off ? POLLOUT : 0))};
  if (!p.events) return -ENOTCONN;
  int n = poll(&p, 1, ms_left(deadline));
  if (n < 0) return -errno;
  if (n == 0) return -ETIMEDOUT;
  if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
    char buf[16384];
    ssize_t r = recv(c->fd, buf, sizeof buf, 0);
    if (r > 0) ASSERT_OK(pa_tls_feed(&c->tls, buf, (size_t)r));
    else if (r == 0) c->eof = 1;
    else if (errno != EAGAIN && errno != EINTR) return -errno;
  }
  if ((p.revents & POLLOUT) && c->out_len > c->out_off) {
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (w > 0) c->out_off += (size_t)w;
    else if (w < 0 && errno != EAGAIN && errno != EINTR) return -errno;
  }
  return 0;
}

/* Send everything the session has queued (a handshake failure's alert, close_notify). */
static int client_drain(client_t *c, uint64_t deadline) {
  while (c->out_len > c->out_off || pa_tls_out_pending(&c->tls) > 0) {
    int e = client_io(c, deadline);
    if (e) return e;
  }
  return 0;
}

/* 0 when established, PA_TLS_EFAIL (the alert is sent on a best-effort basis), or a negative errno. */
static int client_handshake(client_t *c, uint64_t deadline) {
  for (;;) {
    int rc = pa_tls_handshake(&c->tls);
    if (rc == 0) return 0;
    if (rc == PA_TLS_EFAIL) {
      (void)client_drain(c, deadline);
      return rc;
    }
    ASSERT_EQ(rc, PA_TLS_WANT);
    if (c->eof) return -ECONNRESET;
    int e = client_io(c, deadline);
    if (e) return e;
  }
}

static int keep_line(void *ctx, const char *line, size_t len) {
  client_t *c = ctx;
  free(c->line);
  c->line = malloc(len + 1);
  ASSERT_NOT_NULL(c->line);
  memcpy(c->line, line, len);
  c->line[len] = '\0';
  c->line_len = len;
  return 0;
}

/* Read decrypted bytes until the framer has delivered a line. 0, a pa_tls error, or a negative errno. */
static int client_read_line(client_t *c, uint64_t deadline) {
  free(c->line);
  c->line = NULL;
  for (;;) {
    char buf[16384];
    int n = pa_tls_read(&c->tls, buf, sizeof buf);
    if (n > 0) {
      ASSERT_OK(pa_framer_feed(&c->framer, buf, (size_t)n, keep_line, c));
      if (c->line) return 0;
      continue;
    }
    if (n < 0) return n;
    if (c->eof) return -ECONNRESET;
    int e = client_io(c, deadline);
    if (e) return e;
  }
}

/* Write one line and wait for the server's echo of it. */
static void round_trip(client_t *c, const char *line, size_t len, uint64_t deadline) {
  ASSERT_OK(pa_tls_write(&c->tls, line, len));
  ASSERT_GT(pa_tls_out_pending(&c->tls), len - 1); /* encrypted, waiting for the socket */
  int rc = client_read_line(c, deadline);
  if (rc) ASSERT_FAILED("no echo: %d (%s)", rc, pa_tls_error(&c->tls));
  ASSERT_UINT64_EQ(c->line_len, len - 1);
  ASSERT_MEM_EQ(c->line, line, len - 1);
}

/* close_notify both ways: ours is sent, the server answers with its own, pa_tls_read reports the close. */
static void close_notify(client_t *c, uint64_t deadline) {
  pa_tls_shutdown(&c->tls);
  ASSERT_GT(pa_tls_out_pending(&c->tls), 0);
  for (;;) {
    char buf[256];
    int n = pa_tls_read(&c->tls, buf, sizeof buf);
    if (n == PA_TLS_ECLOSED) break;
    if (n != 0) ASSERT_FAILED("read after close_notify: %d (%s)", n, pa_tls_error(&c->tls));
    ASSERT_EQ(c->eof, 0);
    ASSERT_OK(client_io(c, deadline));
  }
  ASSERT_STR_CONTAINS(pa_tls_error(&c->tls), "closed");
}

static void check_version(client_t *c, const echo_server_t *s) {
  const char *v = pa_tls_version(&c->tls);
  ASSERT(strcmp(v, "TLSv1.2") == 0 || strcmp(v, "TLSv1.3") == 0);
  ASSERT_GE(SSL_version(c->tls.ssl), TLS1_2_VERSION);
  ASSERT_EQ(SSL_version(c->tls.ssl), s->version);
}

/* A handshake to a fresh server that must fail; returns the client's error text in `why`. */
static void expect_handshake_failure(const char *ca, const char *server_name, char *why, size_t whylen) {
  echo_server_t s;
  client_t c;
  server_start(&s, 0);
  client_open(&c, ca, server_name, s.port);
  ASSERT_EQ(client_handshake(&c, deadline_after(DEADLINE_MS)), PA_TLS_EFAIL);
  ASSERT_EQ(c.tls.established, 0);
  snprintf(why, whylen, "%s", pa_tls_error(&c.tls));
  /* The handshake also fails on the server's side: the client refused, it did not just go quiet. */
  client_close(&c);
  server_join(&s);
  ASSERT_EQ(s.accepted, 1);
  ASSERT_EQ(s.handshake_ok, 0);
}

TEST_IMPL(tls_handshake_echo_hostname) {
  echo_server_t s;
  client_t c;
  uint64_t deadline = deadline_after(DEADLINE_MS);
  server_start(&s, 0);
  client_open(&c, cert_path("ca.pem"), "localhost", s.port);
  ASSERT_STR_EQ(pa_tls_error(&c.tls), "no error");
  int rc = client_handshake(&c, deadline);
  if (rc) ASSERT_FAILED("handshake: %d (%s)", rc, pa_tls_error(&c.tls));
  ASSERT_EQ(c.tls.established, 1);
  ASSERT_OK(pa_tls_handshake(&c.tls)); /* established stays established */

  static const char hello[] = "{\"v\":\"1\",\"id\":-1,\"method\":\"handshake.hello\",\"params\":{}}\n";
  round_trip(&c, hello, sizeof hello - 1, deadline);

  /* A line far bigger than one TLS record (16 KiB) and than one out_take: many records each way. */
  size_t big_len = 200001;
  char *big = malloc(big_len);
  ASSERT_NOT_NULL(big);
  for (size_t i = 0; i < big_len - 1; i++) big[i] = (char)('A' + i % 26);
  big[big_len - 1] = '\n';
  round_trip(&c, big, big_len, deadline);
  free(big);

  check_version(&c, &s);
  close_notify(&c, deadline);
  client_close(&c);
  server_join(&s);
  if (!s.handshake_ok) ASSERT_FAILED("server: %s", s.error);
  ASSERT_STR_EQ(s.sni, "localhost"); /* a DNS name is sent as SNI */
  ASSERT_UINT64_EQ(s.echoed, sizeof hello - 1 + big_len);
  ASSERT_EQ(s.clean_close, 1);
  return 0;
}

TEST_IMPL(tls_handshake_echo_ip) {
  echo_server_t s;
  client_t c;
  uint64_t deadline = deadline_after(DEADLINE_MS);
  server_start(&s, 0);
  client_open(&c, cert_path("ca.pem"), "127.0.0.1", s.port);
  int rc = client_handshake(&c, deadline);
  if (rc) ASSERT_FAILED("handshake: %d (%s)", rc, pa_tls_error(&c.tls));
  static const char line[] = "{\"v\":\"1\",\"method\":\"heartbeat.post\"}\n";
  round_trip(&c, line, sizeof line - 1, deadline);
  check_version(&c, &s);
  close_notify(&c, deadline);
  client_close(&c);
  server_join(&s);
  ASSERT_EQ(s.handshake_ok, 1);
  ASSERT_STR_EQ(s.sni, ""); /* RFC 6066: no SNI for an IP address literal */
  ASSERT_EQ(s.clean_close, 1);
  return 0;
}

TEST_IMPL(tls_wrong_ca) {
  char why[512];
  expect_handshake_failure(cert_path("other-ca.pem"), "localhost", why, sizeof why);
  ASSERT_STR_CONTAINS(why, "certificate verify failed");
  ASSERT_STR_CONTAINS(why, "local issuer");
  return 0;
}

TEST_IMPL(tls_wrong_server_name) {
  char why[512];
  expect_handshake_failure(cert_path("ca.pem"), "endpoint.example.com", why, sizeof why);
  ASSERT_STR_CONTAINS(why, "certificate verify failed");
  ASSERT_STR_CONTAINS(why, "hostname mismatch");
  /* A name that only partly matches is no match either. */
  expect_handshake_failure(cert_path("ca.pem"), "localhost.localdomain", why, sizeof why);
  ASSERT_STR_CONTAINS(why, "certificate verify failed");
  return 0;
}

TEST_IMPL(tls_wrong_ip_address) {
  char why[512];
  /* Dialled 127.0.0.1, but told to expect 127.0.0.2: the certificate names only 127.0.0.1. */
  expect_handshake_failure(cert_path("ca.pem"), "127.0.0.2", why, sizeof why);
  ASSERT_STR_CONTAINS(why, "certificate verify failed");
  ASSERT_STR_CONTAINS(why, "IP address mismatch");
  return 0;
}

/* A plain OpenSSL client that accepts anything down to TLS 1.0: proves the server below really offers TLS 1.1. */
static int probe_version(int port) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  ASSERT_NOT_NULL(ctx);
  SSL_CTX_set_security_level(ctx, 0);
  ASSERT_EQ(SSL_CTX_set_min_proto_version(ctx, TLS1_VERSION), 1);
  ASSERT_EQ(SSL_CTX_set_cipher_list(ctx, "DEFAULT:@SECLEVEL=0"), 1);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  int fd = tcp_connect(port);
  struct timeval tv = {.tv_sec = DEADLINE_MS / 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  SSL *ssl = SSL_new(ctx);
  ASSERT_NOT_NULL(ssl);
  ASSERT_EQ(SSL_set_fd(ssl, fd), 1);
  int version = SSL_connect(ssl) == 1 ? SSL_version(ssl) : -1;
  if (version > 0) SSL_shutdown(ssl);
  SSL_free(ssl);
  close(fd);
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return version;
}

TEST_IMPL(tls_old_protocol_refused) {
  echo_server_t s;
  server_start(&s, TLS1_1_VERSION);
  int version = probe_version(s.port);
  server_join(&s);
  /* Without that the refusal below would prove nothing: this libssl cannot speak TLS 1.1 at all. */
  if (version != TLS1_1_VERSION) RETURN_SKIP("this OpenSSL build does not serve TLS 1.1 even at security level 0");

  client_t c;
  server_start(&s, TLS1_1_VERSION);
  client_open(&c, cert_path("ca.pem"), "localhost", s.port);
  ASSERT_EQ(client_handshake(&c, deadline_after(DEADLINE_MS)), PA_TLS_EFAIL);
  ASSERT_EQ(c.tls.established, 0);
  ASSERT_STR_CONTAINS(pa_tls_error(&c.tls), "TLS handshake failed");
  client_close(&c);
  server_join(&s);
  ASSERT_EQ(s.handshake_ok, 0);
  return 0;
}

TEST_IMPL(tls_ctx_missing_ca_file) {
  pa_tls_ctx_t ctx;
  char err[512] = "";
  static const char missing[] = "/nonexistent-pyagent-test/ca.pem";
  ASSERT_EQ(pa_tls_ctx_init(&ctx, missing, NULL, NULL, err, sizeof err), PA_TLS_EFAIL);
  ASSERT_STR_CONTAINS(err, missing);
  ASSERT_NULL(ctx.ctx);
  /* A file that exists but holds no certificate is refused the same way. */
  const char *key = cert_path("server.key");
  ASSERT_EQ(pa_tls_ctx_init(&ctx, key, NULL, NULL, err, sizeof err), PA_TLS_EFAIL);
  ASSERT_STR_CONTAINS(err, key);
  ASSERT_NULL(ctx.ctx);
  return 0;
}

TEST_IMPL(tls_ctx_bad_client_key) {
  pa_tls_ctx_t ctx;
  char err[512] = "";
  /* A client certificate with a key that is not its own (mutual TLS misconfigured). */
  ASSERT_EQ(pa_tls_ctx_init(&ctx, cert_path("ca.pem"), cert_path("server.pem"), cert_path("other-ca.key"), err,
                            sizeof err),
            PA_TLS_EFAIL);
  ASSERT_STR_CONTAINS(err, "cannot load the client certificate");
  ASSERT_STR_CONTAINS(err, "key values mismatch");
  ASSERT_NULL(ctx.ctx);
  /* The matching pair loads. */
  if (pa_tls_ctx_init(&ctx, cert_path("ca.pem"), cert_path("server.pem"), cert_path("server.key"), err, sizeof err))
    ASSERT_FAILED("matching pair refused: %s", err);
  ASSERT_NOT_NULL(ctx.ctx);
  pa_tls_ctx_free(&ctx);
  ASSERT_NULL(ctx.ctx);
  return 0;
}

/* The client certificate is read again for every session: a renewed certificate on disk is used by the next
 * connection, and one that disappeared fails that session (with the file named), not the process. */
static void copy_file(const char *from, const char *to) {
  FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
  ASSERT_NOT_NULL(in);
  ASSERT_NOT_NULL(out);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, in)) > 0) ASSERT_EQ(fwrite(buf, 1, n, out), n);
  fclose(in);
  fclose(out);
}

TEST_IMPL(tls_client_cert_reloaded_per_session) {
  char crt[1100], key[1100];
  snprintf(crt, sizeof crt, "%s.reload.crt", cert_path("server.pem"));
  snprintf(key, sizeof key, "%s.reload.key", cert_path("server.key"));
  copy_file(cert_path("server.pem"), crt);
  copy_file(cert_path("server.key"), key);
  pa_tls_ctx_t ctx;
  char err[512] = "";
  if (pa_tls_ctx_init(&ctx, cert_path("ca.pem"), crt, key, err, sizeof err)) ASSERT_FAILED("ctx: %s", err);
  pa_tls_t t;
  ASSERT_EQ(pa_tls_init(&t, &ctx, "localhost"), 0);
  pa_tls_free(&t);
  /* A key that does not match the certificate any more: this session fails, naming the files. */
  copy_file(cert_path("other-ca.key"), key);
  ASSERT_EQ(pa_tls_init(&t, &ctx, "localhost"), PA_TLS_EFAIL);
  ASSERT_STR_CONTAINS(pa_tls_error(&t), "cannot load the client certificate");
  ASSERT_STR_CONTAINS(pa_tls_error(&t), ".reload.key");
  ASSERT_NULL(t.ssl);
  pa_tls_free(&t);
  /* Files gone: the same. */
  remove(crt);
  ASSERT_EQ(pa_tls_init(&t, &ctx, "localhost"), PA_TLS_EFAIL);
  pa_tls_free(&t);
  /* The renewed pair is back: the next session loads it. */
  copy_file(cert_path("server.pem"), crt);
  copy_file(cert_path("server.key"), key);
  ASSERT_EQ(pa_tls_init(&t, &ctx, "localhost"), 0);
  pa_tls_free(&t);
  pa_tls_ctx_free(&ctx);
  remove(crt);
  remove(key);
  return 0;
}
