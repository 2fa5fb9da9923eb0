/* The host logger. Every line is built in a local buffer and written with one write(2) so lines from the libuv
 * thread and the Python main thread never interleave; no lock is needed for that on a pipe or a regular file. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static int pa__log_level = PA_LOG_INFO;

void pa_log_set_level(int level) { pa__log_level = level; }

int pa_log_level(void) { return pa__log_level; }

int pa_log_level_from_name(const char *name) {
  if (strcasecmp(name, "debug") == 0) return PA_LOG_DEBUG;
  if (strcasecmp(name, "info") == 0) return PA_LOG_INFO;
  if (strcasecmp(name, "warning") == 0 || strcasecmp(name, "warn") == 0) return PA_LOG_WARNING;
  if (strcasecmp(name, "error") == 0) return PA_LOG_ERROR;
  return -1;
}

static const char *level_name(int level) {
  if (level >= PA_LOG_ERROR) return "error";
  if (level >= PA_LOG_WARNING) return "warning";
  if (level >= PA_LOG_INFO) return "info";
  return "debug";
}

static size_t stamp(char *buf, size_t cap, int level) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(buf, cap, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s ", tm.tm_year + 1900, tm.tm_mon + 1,
                   tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, level_name(level));
  return n < 0 ? 0 : (size_t)n >= cap ? cap - 1 : (size_t)n;
}

static void emit(char *buf, size_t len, size_t cap) {
  if (len >= cap - 1) len = cap - 2;
  buf[len++] = '\n';
  ssize_t off = 0;
  while ((size_t)off < len) {
    ssize_t w = write(STDERR_FILENO, buf + off, len - (size_t)off);
    if (w <= 0) return; /* Nothing sensible to do when stderr is gone. */
    off += w;
  }
}

void pa_log(int level, const char *event, const char *fmt, ...) {
  if (level < pa__log_level) return;
  char buf[2048];
  size_t n = stamp(buf, sizeof buf, level);
  int m = snprintf(buf + n, sizeof buf - n, "logger=pyagent.host event=%s ", event);
  if (m > 0) n += (size_t)m < sizeof buf - n ? (size_t)m : sizeof buf - n - 1;
  va_list ap;
  va_start(ap, fmt);
  m = vsnprintf(buf + n, sizeof buf - n, fmt, ap);
  va_end(ap);
  if (m > 0) n += (size_t)m < sizeof buf - n ? (size_t)m : sizeof buf - n - 1;
  while (n > 0 && buf[n - 1] == ' ') n--;
  emit(buf, n, sizeof buf);
}

void pa_log_line(int level, const char *line) {
  if (level < pa__log_level) return;
  char buf[4096];
  size_t n = stamp(buf, sizeof buf, level);
  size_t len = strlen(line);
  if (len > sizeof buf - n - 2) len = sizeof buf - n - 2;
  memcpy(buf + n, line, len);
  n += len;
  for (size_t i = 0; i < n; i++)
    if (buf[i] == '\n') buf[i] = ' ';
  emit(buf, n, sizeof buf);
}

char *pa_log_quote(char *dst, size_t cap, const char *src) {
  size_t j = 0;
  if (cap < 3) {
    if (cap) dst[0] = '\0';
    return dst;
  }
  dst[j++] = '"';
  for (const char *p = src ? src : ""; *p && j + 3 < cap; p++) {
    char c = *p;
    if (c == '"' || c == '\\') {
      dst[j++] = '\\';
      dst[j++] = c;
    } else if (c == '\n' || c == '\r') {
      dst[j++] = ' ';
    } else {
      dst[j++] = c;
    }
  }
  dst[j++] = '"';
  dst[j] = '\0';
  return dst;
}
