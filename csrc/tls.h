/* TLS client over OpenSSL memory BIOs. No sockets in here: the caller feeds ciphertext in and takes ciphertext out,
 * which keeps libuv and OpenSSL apart (the shape measured in shared/research/embed-probe.md). */
#ifndef PA_TLS_H
#define PA_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

/* Result codes (negative, like every pa_ function). */
#define PA_TLS_WANT (1)          /* handshake in progress: more input needed */
#define PA_TLS_EFAIL (-7101)     /* handshake or record failure; pa_tls_error() says why */
#define PA_TLS_ECLOSED (-7102)   /* the peer sent close_notify */

typedef struct pa_tls_ctx_s {
  SSL_CTX *ctx;
  /* The client certificate and key (mutual TLS), loaded again for every session so that a certificate renewed on
   * disk is used from the next connection on, without restarting the host. NULL: no client certificate. */
  char *cert_file;
  char *key_file;
} pa_tls_ctx_t;

typedef struct pa_tls_s {
  SSL *ssl;
  BIO *rbio; /* ciphertext from the network, written by us, read by OpenSSL */
  BIO *wbio; /* ciphertext for the network, written by OpenSSL, read by us */
  int established;
  char error[256];
} pa_tls_t;

/* A client context that trusts only `ca_file` (the pinned endpoint CA; never the system store), TLS 1.2 minimum.
 * With cert_file/key_file (may be NULL) the client presents a certificate (mutual TLS). */
int pa_tls_ctx_init(pa_tls_ctx_t *c, const char *ca_file, const char *cert_file, const char *key_file, char *err,
                    size_t errlen);
void pa_tls_ctx_free(pa_tls_ctx_t *c);

/* A session that will check the server certificate names `server_name` (a DNS name or an IP address literal) and
 * presents the client certificate currently in the ctx's cert_file/key_file. */
int pa_tls_init(pa_tls_t *t, pa_tls_ctx_t *c, const char *server_name);
void pa_tls_free(pa_tls_t *t);

/* Drive the handshake: 0 when established, PA_TLS_WANT, or PA_TLS_EFAIL. */
int pa_tls_handshake(pa_tls_t *t);
/* Give OpenSSL ciphertext that arrived from the network. */
int pa_tls_feed(pa_tls_t *t, const char *data, size_t n);
/* Decrypted bytes into buf: > 0 bytes, 0 when none are ready yet, PA_TLS_ECLOSED or PA_TLS_EFAIL. */
int pa_tls_read(pa_tls_t *t, char *buf, size_t cap);
/* Encrypt application bytes (only once established); the ciphertext waits in wbio. */
int pa_tls_write(pa_tls_t *t, const char *data, size_t n);
/* Ciphertext waiting to be sent. */
size_t pa_tls_out_pending(const pa_tls_t *t);
/* Take up to cap bytes of waiting ciphertext; returns the count. */
size_t pa_tls_out_take(pa_tls_t *t, char *buf, size_t cap);
/* Queue close_notify. */
void pa_tls_shutdown(pa_tls_t *t);
const char *pa_tls_error(const pa_tls_t *t);
const char *pa_tls_version(const pa_tls_t *t);

#endif
