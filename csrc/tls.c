#include "tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

static void take_openssl_error(char *buf, size_t cap, const char *what) {
  unsigned long e = ERR_get_error();
  char detail[200] = "no detail";
  if (e) ERR_error_string_n(e, detail, sizeof detail);
  ERR_clear_error();
  snprintf(buf, cap, "%s: %s", what, detail);
}

int pa_tls_ctx_init(pa_tls_ctx_t *c, const char *ca_file, const char *cert_file, const char *key_file, char *err,
                    size_t errlen) {
  memset(c, 0, sizeof *c);
  c->ctx = SSL_CTX_new(TLS_client_method());
  if (!c->ctx) {
    take_openssl_error(err, errlen, "SSL_CTX_new failed");
    return PA_TLS_EFAIL;
  }
  SSL_CTX_set_min_proto_version(c->ctx, TLS1_2_VERSION);
  SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
  /* Pinned CA only: no SSL_CTX_set_default_verify_paths, the system store is never consulted. */
  if (SSL_CTX_load_verify_locations(c->ctx, ca_file, NULL) != 1) {
    char what[512];
    snprintf(what, sizeof what, "cannot load CA file '%s'", ca_file);
    take_openssl_error(err, errlen, what);
    pa_tls_ctx_free(c);
    return PA_TLS_EFAIL;
  }
  if (cert_file && key_file) {
    if (SSL_CTX_use_certificate_chain_file(c->ctx, cert_file) != 1 ||
        SSL_CTX_use_PrivateKey_file(c->ctx, key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(c->ctx) != 1) {
      char what[1100];
      snprintf(what, sizeof what, "cannot load the client certificate '%s' or key '%s'", cert_file, key_file);
      take_openssl_error(err, errlen, what);
      pa_tls_ctx_free(c);
      return PA_TLS_EFAIL;
    }
    c->cert_file = strdup(cert_file);
    c->key_file = strdup(key_file);
    if (!c->cert_file || !c->key_file) {
      snprintf(err, errlen, "out of memory");
      pa_tls_ctx_free(c);
      return PA_TLS_EFAIL;
    }
  }
  return 0;
}

void pa_tls_ctx_free(pa_tls_ctx_t *c) {
  if (c->ctx) SSL_CTX_free(c->ctx);
  free(c->cert_file);
  free(c->key_file);
  c->ctx = NULL;
  c->cert_file = c->key_file = NULL;
}

static int is_ip_literal(const char *name) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

int pa_tls_init(pa_tls_t *t, pa_tls_ctx_t *c, const char *server_name) {
  memset(t, 0, sizeof *t);
  t->ssl = SSL_new(c->ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) {
    take_openssl_error(t->error, sizeof t->error, "cannot allocate a TLS session");
    if (t->rbio) BIO_free(t->rbio);
    if (t->wbio) BIO_free(t->wbio);
    if (t->ssl) SSL_free(t->ssl);
    memset(t, 0, sizeof *t);
    return PA_TLS_EFAIL;
  }
  /* An empty memory BIO means "no data yet", not end of file. */
  BIO_set_mem_eof_return(t->rbio, -1);
  BIO_set_mem_eof_return(t->wbio, -1);
  SSL_set_bio(t->ssl, t->rbio, t->wbio); /* the SSL now owns both BIOs */
  SSL_set_connect_state(t->ssl);
  if (c->cert_file && c->key_file &&
      (SSL_use_certificate_chain_file(t->ssl, c->cert_file) != 1 ||
       SSL_use_PrivateKey_file(t->ssl, c->key_file, SSL_FILETYPE_PEM) != 1 || SSL_check_private_key(t->ssl) != 1)) {
    char what[1100];
    snprintf(what, sizeof what, "cannot load the client certificate '%s' or key '%s'", c->cert_file, c->key_file);
    take_openssl_error(t->error, sizeof t->error, what);
    SSL_free(t->ssl); /* frees both BIOs */
    t->ssl = NULL;
    t->rbio = t->wbio = NULL;
    return PA_TLS_EFAIL;
  }
  X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
  if (is_ip_literal(server_name)) {
    X509_VERIFY_PARAM_set1_ip_asc(param, server_name);
  } else {
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    SSL_set1_host(t->ssl, server_name);
    SSL_set_tlsext_host_name(t->ssl, server_name);
  }
  return 0;
}

void pa_tls_free(pa_tls_t *t) {
  if (t->ssl) SSL_free(t->ssl);
  memset(t, 0, sizeof *t);
}

static int fail(pa_tls_t *t, const char *what) {
  long vr = SSL_get_verify_result(t->ssl);
  if (vr != X509_V_OK) {
    snprintf(t->error, sizeof t->error, "%s: certificate verify failed: %s (is 'ca' the endpoint's CA, and does the certificate name the endpoint?)",
             what, X509_verify_cert_error_string(vr));
    ERR_clear_error();
  } else {
    take_openssl_error(t->error, sizeof t->error, what);
  }
  return PA_TLS_EFAIL;
}

int pa_tls_handshake(pa_tls_t *t) {
  if (t->established) return 0;
  int r = SSL_do_handshake(t->ssl);
  if (r == 1) {
    t->established = 1;
    return 0;
  }
  int e = SSL_get_error(t->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return PA_TLS_WANT;
  return fail(t, "TLS handshake failed");
}

int pa_tls_feed(pa_tls_t *t, const char *data, size_t n) {
  while (n > 0) {
    int w = BIO_write(t->rbio, data, n > 1 << 30 ? 1 << 30 : (int)n);
    if (w <= 0) return fail(t, "cannot buffer incoming TLS data");
    data += w;
    n -= (size_t)w;
  }
  return 0;
}

int pa_tls_read(pa_tls_t *t, char *buf, size_t cap) {
  int r = SSL_read(t->ssl, buf, cap > 1 << 30 ? 1 << 30 : (int)cap);
  if (r > 0) return r;
  int e = SSL_get_error(t->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  if (e == SSL_ERROR_ZERO_RETURN) {
    snprintf(t->error, sizeof t->error, "the peer closed the TLS session");
    return PA_TLS_ECLOSED;
  }
  return fail(t, "TLS read failed");
}

int pa_tls_write(pa_tls_t *t, const char *data, size_t n) {
  while (n > 0) {
    int w = SSL_write(t->ssl, data, n > 1 << 30 ? 1 << 30 : (int)n);
    if (w <= 0) return fail(t, "TLS write failed");
    data += w;
    n -= (size_t)w;
  }
  return 0;
}

size_t pa_tls_out_pending(const pa_tls_t *t) { return t->wbio ? BIO_ctrl_pending(t->wbio) : 0; }

size_t pa_tls_out_take(pa_tls_t *t, char *buf, size_t cap) {
  int r = BIO_read(t->wbio, buf, cap > 1 << 30 ? 1 << 30 : (int)cap);
  return r > 0 ? (size_t)r : 0;
}

void pa_tls_shutdown(pa_tls_t *t) {
  if (t->ssl && t->established) SSL_shutdown(t->ssl);
  ERR_clear_error();
}

const char *pa_tls_error(const pa_tls_t *t) { return t->error[0] ? t->error : "no error"; }

const char *pa_tls_version(const pa_tls_t *t) { return t->ssl ? SSL_get_version(t->ssl) : "none"; }
