/* Crash capture: fatal-signal handlers that write a minimal crash record with signal-safe calls and start Crashpad's
 * `crashpad_handler` as a direct child to write a minidump (DESIGN.md §2, "Crash capture").
 *
 * Everything the handler needs (paths, the handler's argv, the record's static text) is prepared by pa_crash_init;
 * the handler itself allocates nothing, takes no lock and calls only async-signal-safe functions. */
#ifndef PA_CRASH_H
#define PA_CRASH_H

#include <stddef.h>

#include <uv.h>

#define PA_CRASH_MAX_ANNOTATIONS 32

/* Test crashes (pa_crash_test). */
enum { PA_CRASH_SEGV = 1, PA_CRASH_ABORT = 2, PA_CRASH_STACK_OVERFLOW = 3 };
enum { PA_CRASH_THREAD_MAIN = 1, PA_CRASH_THREAD_LIBUV = 2 };

/* Installs the handlers for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT and a sigaltstack for the calling thread (the
 * Python main thread). `dir` must exist: the record is written there and the Crashpad database is `dir`/crashpad.
 * `handler` is the crashpad_handler executable, or NULL/"" for records only. `annotations` are "key=value" strings.
 * The handler that was installed before (Python's faulthandler) is called after ours has written its files.
 * Returns 0, -EALREADY when called twice, -EINVAL/-ENOMEM with a message in err. */
int pa_crash_init(const char *dir, const char *handler, const char *const *annotations, size_t n_annotations,
                  int allow_test_crashes, char *err, size_t errlen);

/* Whether pa_crash_init succeeded. */
int pa_crash_enabled(void);

/* Called first and last on every thread the host creates (the libuv thread): gives it its own sigaltstack so that a
 * stack overflow there still reaches the handler. `loop` is the thread's loop: when test crashes are allowed, a test
 * crash on this thread is delivered through an async handle on it (closed again by pa_crash_thread_leave). */
int pa_crash_thread_enter(uv_loop_t *loop);
void pa_crash_thread_leave(void);

/* Crashes the process the way `kind` says on `thread` (test hook; -EPERM unless allowed at init, -EINVAL on a bad
 * kind or thread, -ESRCH when the libuv thread is not running). Returns only on error or, for the libuv thread, once
 * the crash is requested. */
int pa_crash_test(int kind, int thread);

/* Signal-safe formatting helpers (exposed for the unit tests). `pa__fmt_*` append to buf[*len] within cap. */
void pa__fmt_str(char *buf, size_t *len, size_t cap, const char *s);
void pa__fmt_u64(char *buf, size_t *len, size_t cap, unsigned long long v);
void pa__fmt_hex(char *buf, size_t *len, size_t cap, unsigned long long v);
const char *pa__signal_name(int sig);

#endif
