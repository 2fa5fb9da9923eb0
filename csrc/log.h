/* One logger for the whole host: key=value lines, one write(2) per line, safe from any thread. */
#ifndef PA_LOG_H
#define PA_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum {
  PA_LOG_DEBUG = 10,
  PA_LOG_INFO = 20,
  PA_LOG_WARNING = 30,
  PA_LOG_ERROR = 40
};

void pa_log_set_level(int level);
int pa_log_level(void);
int pa_log_level_from_name(const char *name); /* -1 when unknown */

/* pa_log(level, "session.up", "endpoint=%s rtt_ms=%.2f", ...): the event name and the caller's key=value pairs. */
void pa_log(int level, const char *event, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A line already formatted by the Python runtime (its own key=value pairs). */
void pa_log_line(int level, const char *line);

/* Escape a value for a key=value line: quotes and backslashes escaped, newlines folded. Returns dst. */
char *pa_log_quote(char *dst, size_t cap, const char *src);

#endif
