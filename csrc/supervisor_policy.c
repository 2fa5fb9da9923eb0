/* The supervisor's policy, kept apart from its process (supervisor.c) so the C unit tests reach it without a loop:
 * its settings (the JSON from `pyagent-host check-config --json`), how a worker's exit is classified and what follows,
 * the crash-loop window, /proc parsing for the caps, and the bounded restart log. No libuv, no signals. */
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"

/* ---------------------------------------------------------------------------------------------------------------- */
/* Settings                                                                                                         */

static int get_u64(json_t *obj, const char *key, uint64_t lo, uint64_t hi, uint64_t *out, char *err, size_t cap) {
  json_t *v = json_object_get(obj, key);
  if (!v) {
    snprintf(err, cap, "supervisor settings: missing key 'supervisor.%s'", key);
    return -1;
  }
  if (!json_is_integer(v) || json_integer_value(v) < 0 || (uint64_t)json_integer_value(v) < lo ||
      (uint64_t)json_integer_value(v) > hi) {
    snprintf(err, cap, "supervisor settings: key 'supervisor.%s' must be an integer between %" PRIu64 " and %" PRIu64,
             key, lo, hi);
    return -1;
  }
  *out = (uint64_t)json_integer_value(v);
  return 0;
}

static char *dup_string(json_t *obj, const char *key) {
  const char *v = json_string_value(json_object_get(obj, key));
  return v && *v ? strdup(v) : NULL;
}

int pa_sup_settings_parse(const char *text, size_t len, pa_sup_settings_t *s, char *err, size_t cap) {
  memset(s, 0, sizeof *s);
  json_error_t jerr;
  json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
  if (!doc) {
    snprintf(err, cap, "supervisor settings: invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
             jerr.text);
    return -1;
  }
  int rc = -1;
  if (!json_is_object(doc)) {
    snprintf(err, cap, "supervisor settings: not a JSON object");
    goto done;
  }
  json_t *ok = json_object_get(doc, "ok");
  if (!json_is_boolean(ok)) {
    snprintf(err, cap, "supervisor settings: missing boolean key 'ok'");
    goto done;
  }
  s->config_ok = json_is_true(ok);
  s->error = dup_string(doc, "error");
  json_t *sup = json_object_get(doc, "supervisor");
  if (!json_is_string(json_object_get(doc, "state_dir"))) {
    /* No settings at all: the config file itself is bad; its message is the error. */
    snprintf(err, cap, "%s", s->error ? s->error : "supervisor settings: missing key 'state_dir'");
    goto done;
  }
  s->config = dup_string(doc, "config");
  s->state_dir = dup_string(doc, "state_dir");
  if (!s->config || !s->state_dir || s->config[0] != '/' || s->state_dir[0] != '/') {
    snprintf(err, cap, "supervisor settings: 'config' and 'state_dir' must be absolute paths");
    goto done;
  }
  const char *level = json_string_value(json_object_get(doc, "log_level"));
  s->log_level = level ? pa_log_level_from_name(level) : -1;
  if (s->log_level < 0) {
    snprintf(err, cap, "supervisor settings: key 'log_level' must be debug, info, warning or error");
    goto done;
  }
  if (!json_is_object(sup)) {
    snprintf(err, cap, "supervisor settings: missing object 'supervisor'");
    goto done;
  }
  uint64_t rss_mb, loop_count;
  if (get_u64(sup, "max_rss_mb", 0, 1u << 20, &rss_mb, err, cap) ||
      get_u64(sup, "check_interval_ms", 100, 3600000, &s->check_interval_ms, err, cap) ||
      get_u64(sup, "restart_min_ms", 1, 3600000, &s->restart_min_ms, err, cap) ||
      get_u64(sup, "restart_max_ms", 1, 86400000, &s->restart_max_ms, err, cap) ||
      get_u64(sup, "stable_ms", 0, 86400000, &s->stable_ms, err, cap) ||
      get_u64(sup, "crash_loop_count", 1, PA_SUP_CRASH_LOOP_MAX, &loop_count, err, cap) ||
      get_u64(sup, "crash_loop_window_ms", 1000, 86400000, &s->crash_loop_window_ms, err, cap) ||
      get_u64(sup, "stop_timeout_ms", 100, 600000, &s->stop_timeout_ms, err, cap))
    goto done;
  /* probation_ms came with updates (issue 4): a check-config from before then does not print it. */
  if (!json_object_get(sup, "probation_ms")) s->probation_ms = PA_SUP_PROBATION_MS_DEFAULT;
  else if (get_u64(sup, "probation_ms", 1000, 3600000, &s->probation_ms, err, cap))
    goto done;
  if (!json_object_get(sup, "probation_handshake_ms")) s->probation_handshake_ms = PA_SUP_PROBATION_HANDSHAKE_MS_DEFAULT;
  else if (get_u64(sup, "probation_handshake_ms", 1000, 3600000, &s->probation_handshake_ms, err, cap))
    goto done;
  s->max_rss_kb = rss_mb * 1024;
  s->crash_loop_count = (unsigned)loop_count;
  json_t *cpu = json_object_get(sup, "max_cpu_percent");
  if (!json_is_number(cpu) || json_number_value(cpu) < 0 || json_number_value(cpu) > 100000) {
    snprintf(err, cap, "supervisor settings: key 'supervisor.max_cpu_percent' must be a number between 0 and 100000");
    goto done;
  }
  s->max_cpu_percent = json_number_value(cpu);
  if (s->restart_max_ms < s->restart_min_ms) {
    snprintf(err, cap, "supervisor settings: 'supervisor.restart_max_ms' is less than 'supervisor.restart_min_ms'");
    goto done;
  }
  rc = 0;
done:
  json_decref(doc);
  if (rc != 0) pa_sup_settings_free(s);
  return rc;
}

void pa_sup_settings_free(pa_sup_settings_t *s) {
  free(s->config);
  free(s->state_dir);
  free(s->error);
  s->config = s->state_dir = s->error = NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Policy (pure)                                                                                                    */

static int is_core_signal(int sig) {
  return sig == SIGSEGV || sig == SIGABRT || sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGSYS ||
         sig == SIGTRAP || sig == SIGQUIT;
}

const char *pa_sup_classify(int64_t exit_status, int term_signal, const char *killed_for, int stopping,
                            pa_sup_action_t *action, int *abnormal) {
  *abnormal = 0;
  if (stopping) {
    *action = PA_SUP_STOP;
    return "stopping";
  }
  if (killed_for) {
    *action = PA_SUP_RESTART_BACKOFF;
    *abnormal = 1;
    return killed_for;
  }
  if (term_signal) {
    *action = PA_SUP_RESTART_BACKOFF;
    *abnormal = 1;
    return is_core_signal(term_signal) ? "crash" : "signal";
  }
  switch (exit_status) {
    case 0:
      *action = PA_SUP_STOP;
      return "stopped";
    case PA_WORKER_EXIT_RESTART:
      *action = PA_SUP_RESTART_NOW;
      return "restart_requested";
    case PA_WORKER_EXIT_UPDATE:
      *action = PA_SUP_RESTART_NOW;
      return "update";
    case PA_WORKER_EXIT_CONFIG:
      *action = PA_SUP_RESTART_SLOW;
      *abnormal = 1;
      return "config_error";
    case PA_WORKER_EXIT_REFUSED:
      *action = PA_SUP_RESTART_SLOW;
      *abnormal = 1;
      return "enroll_refused";
    default:
      *action = PA_SUP_RESTART_BACKOFF;
      *abnormal = 1;
      return "exit";
  }
}

int pa_sup_crashes_note(pa_sup_crashes_t *c, uint64_t now_ms, unsigned count, uint64_t window_ms) {
  if (c->n == PA_SUP_CRASH_LOOP_MAX) {
    memmove(c->at_ms, c->at_ms + 1, (PA_SUP_CRASH_LOOP_MAX - 1) * sizeof c->at_ms[0]);
    c->n--;
  }
  c->at_ms[c->n++] = now_ms;
  unsigned drop = 0;
  while (drop < c->n && now_ms - c->at_ms[drop] > window_ms) drop++;
  if (drop) {
    memmove(c->at_ms, c->at_ms + drop, (c->n - drop) * sizeof c->at_ms[0]);
    c->n -= drop;
  }
  return count > 0 && c->n >= count;
}

int pa_sup_parse_statm(const char *text, uint64_t *resident_pages) {
  unsigned long long size, resident;
  if (sscanf(text, "%llu %llu", &size, &resident) != 2) return -1;
  *resident_pages = resident;
  return 0;
}

int pa_sup_parse_stat(const char *text, uint64_t *cpu_ticks) {
  /* "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are counted after the last ')'. */
  const char *p = strrchr(text, ')');
  if (!p) return -1;
  p++;
  unsigned long long utime = 0, stime = 0;
  for (int field = 3; field <= 15; field++) {
    while (*p == ' ') p++;
    if (!*p) return -1;
    char *end;
    if (field == 14 || field == 15) {
      errno = 0;
      unsigned long long v = strtoull(p, &end, 10);
      if (end == p || errno) return -1;
      if (field == 14) utime = v;
      else stime = v;
      p = end;
    } else {
      while (*p && *p != ' ') p++;
    }
  }
  *cpu_ticks = utime + stime;
  return 0;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* The bounded restart log                                                                                          */

/* Read a whole (small) file; NULL on error. The caller frees. */
static char *read_file(const char *path, size_t limit, size_t *len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NULL;
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap + 1);
  while (buf) {
    if (n == cap) {
      if (cap >= limit) break;
      char *bigger = realloc(buf, cap * 2 + 1);
      if (!bigger) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = bigger;
      cap *= 2;
    }
    ssize_t r = read(fd, buf + n, cap - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      free(buf);
      buf = NULL;
      break;
    }
    if (r == 0) break;
    n += (size_t)r;
  }
  close(fd);
  if (buf) {
    buf[n] = '\0';
    *len = n;
  }
  return buf;
}

int pa_sup_write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int compact(const char *path, size_t keep) {
  size_t len;
  char *buf = read_file(path, 4 * PA_SUP_RESTARTS_MAX_BYTES + keep, &len);
  if (!buf) return -errno;
  size_t start = len > keep ? len - keep : 0;
  if (start > 0) {
    const char *nl = memchr(buf + start, '\n', len - start);
    start = nl ? (size_t)(nl - buf) + 1 : len;
  }
  char tmp[PATH_MAX];
  if (snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid()) >= (int)sizeof tmp) {
    free(buf);
    return -ENAMETOOLONG;
  }
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int rc = fd < 0 ? -errno : 0;
  if (rc == 0 && pa_sup_write_all(fd, buf + start, len - start) != 0) rc = -errno ? -errno : -EIO;
  if (fd >= 0 && close(fd) != 0 && rc == 0) rc = -errno;
  if (rc == 0 && rename(tmp, path) != 0) rc = -errno;
  if (rc != 0) unlink(tmp);
  free(buf);
  return rc;
}

int pa_sup_append_bounded(const char *path, const char *line, size_t max_bytes) {
  size_t n = strlen(line);
  if (n + 1 > max_bytes / 2) return -EMSGSIZE;
  struct stat st;
  if (stat(path, &st) == 0 && (size_t)st.st_size + n + 1 > max_bytes) {
    int rc = compact(path, max_bytes / 2 - n - 1);
    if (rc != 0) return rc;
  }
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return -errno;
  /* One write(2) of the line and its newline: a reader never sees half a record. */
  char *rec = malloc(n + 1);
  int rc = 0;
  if (!rec) {
    rc = -ENOMEM;
  } else {
    memcpy(rec, line, n);
    rec[n] = '\n';
    if (pa_sup_write_all(fd, rec, n + 1) != 0) rc = errno ? -errno : -EIO;
    free(rec);
  }
  if (close(fd) != 0 && rc == 0) rc = -errno;
  return rc;
}

uint64_t pa_sup_last_seq(const char *path) {
  size_t len;
  char *buf = read_file(path, 4 * PA_SUP_RESTARTS_MAX_BYTES, &len);
  if (!buf) return 0;
  uint64_t seq = 0;
  char *save = NULL;
  for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    json_t *rec = json_loads(line, 0, NULL);
    json_t *v = json_object_get(rec, "seq");
    if (json_is_integer(v) && json_integer_value(v) > 0 && (uint64_t)json_integer_value(v) > seq)
      seq = (uint64_t)json_integer_value(v);
    json_decref(rec);
  }
  free(buf);
  return seq;
}
