/* Crash capture (see crash.h). The protocol for driving crashpad_handler from C was verified on this OS
 * (shared/research/crashpad-probe.md):
 *
 * - the handler runs on a per-thread sigaltstack (a stack overflow leaves no stack to run on otherwise);
 * - it fills a packed {siginfo address, context address, thread id} struct and passes its address to
 *   `crashpad_handler --trace-parent-with-exception=0x…`, which ptraces us (its parent) and writes the minidump;
 * - the child is started with a raw clone syscall, not fork(): glibc's fork runs atfork handlers and takes locks, which
 *   deadlocks when the crash happened inside malloc;
 * - the child must be allowed to ptrace its parent: PR_SET_DUMPABLE, and PR_SET_PTRACER naming the child (set by the
 *   parent before the child may exec, through a pipe) for Yama;
 * - no upload at crash time: the next worker uploads the report over its own session.
 *
 * A minimal record (signal, code, fault address, thread, time, backtrace) is written before the minidump is attempted,
 * so that a crash where ptrace is forbidden (seccomp, containers) or the handler is missing is still reported.
 *
 * After our files are written, the handler installed before ours (Python's faulthandler, which writes the Python
 * tracebacks to a file) is called with the real siginfo and context, then the default action is restored and the
 * signal re-raised so that the process dies of the original signal. */
#include "crash.h"

#include <errno.h>
#include <execinfo.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "worker.h"

#define ALTSTACK_MIN (64u * 1024u)
#define HANDLER_TIMEOUT_MS 15000
#define MAX_ARGS (PA_CRASH_MAX_ANNOTATIONS + 8)
#define BACKTRACE_DEPTH 64

extern char **environ;

static const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
#define N_FATAL (sizeof fatal_signals / sizeof fatal_signals[0])

/* What crashpad_handler reads from our memory (crashpad's ExceptionInformation, packed). */
struct pa_exception_information {
  uint64_t siginfo_address;
  uint64_t context_address;
  int32_t thread_id;
} __attribute__((packed));

static struct pa_exception_information pa__exc_info;

/* Prepared by pa_crash_init; read-only afterwards. */
static int pa__crash_ready;
static int pa__allow_test;
static char pa__record_path[PATH_MAX];
static char pa__handler_exe[PATH_MAX];
static char *pa__argv[MAX_ARGS];
static char *pa__envp[4];
static char *pa__record_static; /* host version and annotations, one "key: value" per line */
static size_t pa__record_static_len;
static struct sigaction pa__prev[N_FATAL];
static pid_t pa__main_tid;

static atomic_int pa__libuv_tid;
static atomic_int pa__handling; /* tid of the thread handling a crash, 0 when none */

/* The test hook's way onto the libuv thread. */
static uv_mutex_t pa__test_lock;
static uv_async_t pa__test_async;
static uv_loop_t *pa__test_loop;
static int pa__test_live;
static atomic_int pa__test_kind;

/* Per-thread alternate signal stack (the libuv thread's; the main thread's lives as long as the process). */
static _Thread_local void *pa__altstack;

/* ---- signal-safe formatting ---------------------------------------------------------------------------------------- */

void pa__fmt_str(char *buf, size_t *len, size_t cap, const char *s) {
  while (*s && *len + 1 < cap) buf[(*len)++] = *s++;
  buf[*len] = '\0';
}

void pa__fmt_u64(char *buf, size_t *len, size_t cap, unsigned long long v) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v && n < sizeof tmp);
  while (n && *len + 1 < cap) buf[(*len)++] = tmp[--n];
  buf[*len] = '\0';
}

void pa__fmt_hex(char *buf, size_t *len, size_t cap, unsigned long long v) {
  static const char digits[] = "0123456789abcdef";
  char tmp[20];
  size_t n = 0;
  do {
    tmp[n++] = digits[v & 15];
    v >>= 4;
  } while (v && n < sizeof tmp);
  pa__fmt_str(buf, len, cap, "0x");
  while (n && *len + 1 < cap) buf[(*len)++] = tmp[--n];
  buf[*len] = '\0';
}

const char *pa__signal_name(int sig) {
  switch (sig) {
  case SIGSEGV: return "SIGSEGV";
  case SIGBUS: return "SIGBUS";
  case SIGFPE: return "SIGFPE";
  case SIGILL: return "SIGILL";
  case SIGABRT: return "SIGABRT";
  case SIGTRAP: return "SIGTRAP";
  case SIGSYS: return "SIGSYS";
  default: return "SIG?";
  }
}

static void write_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= (size_t)w;
  }
}

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_ms(unsigned ms) {
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
  }
}

/* ---- the handler --------------------------------------------------------------------------------------------------- */

static const char *thread_name(pid_t tid) {
  if (tid == pa__main_tid) return "main";
  if (tid == atomic_load(&pa__libuv_tid)) return "libuv";
  return "other";
}

static int write_record_head(int sig, const siginfo_t *info, pid_t tid) {
  int fd = open(pa__record_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  char b[1024];
  size_t n = 0;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  pa__fmt_str(b, &n, sizeof b, "pyagent crash record 1\nsignal: ");
  pa__fmt_u64(b, &n, sizeof b, (unsigned)sig);
  pa__fmt_str(b, &n, sizeof b, " ");
  pa__fmt_str(b, &n, sizeof b, pa__signal_name(sig));
  pa__fmt_str(b, &n, sizeof b, "\ncode: ");
  if (info->si_code < 0) {
    pa__fmt_str(b, &n, sizeof b, "-");
    pa__fmt_u64(b, &n, sizeof b, (unsigned long long)(-(long long)info->si_code));
  } else {
    pa__fmt_u64(b, &n, sizeof b, (unsigned long long)info->si_code);
  }
  pa__fmt_str(b, &n, sizeof b, "\naddress: ");
  pa__fmt_hex(b, &n, sizeof b, (unsigned long long)(uintptr_t)info->si_addr);
  pa__fmt_str(b, &n, sizeof b, "\npid: ");
  pa__fmt_u64(b, &n, sizeof b, (unsigned long long)getpid());
  pa__fmt_str(b, &n, sizeof b, "\ntid: ");
  pa__fmt_u64(b, &n, sizeof b, (unsigned long long)tid);
  pa__fmt_str(b, &n, sizeof b, "\nthread: ");
  pa__fmt_str(b, &n, sizeof b, thread_name(tid));
  pa__fmt_str(b, &n, sizeof b, "\ntime_ns: ");
  pa__fmt_u64(b, &n, sizeof b, (unsigned long long)now.tv_sec * 1000000000ull + (unsigned long long)now.tv_nsec);
  pa__fmt_str(b, &n, sizeof b, "\n");
  write_all(fd, b, n);
  write_all(fd, pa__record_static, pa__record_static_len);
  write_all(fd, "backtrace:\n", 11);
  /* backtrace() was called once at init, so libgcc's unwinder is loaded and this does not allocate. */
  void *frames[BACKTRACE_DEPTH];
  int depth = backtrace(frames, BACKTRACE_DEPTH);
  backtrace_symbols_fd(frames, depth, fd);
  write_all(fd, "end backtrace\n", 14);
  return fd;
}

/* Starts crashpad_handler as a direct child and waits for it (bounded). Returns a short status for the record. */
static const char *run_handler(void *uc, siginfo_t *info, pid_t tid, int *status_out) {
  pa__exc_info.siginfo_address = (uint64_t)(uintptr_t)info;
  pa__exc_info.context_address = (uint64_t)(uintptr_t)uc;
  pa__exc_info.thread_id = (int32_t)tid;
  prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
  int pfd[2];
  int have_pipe = pipe2(pfd, O_CLOEXEC) == 0;
  if (!have_pipe) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  long pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0L, 0L, 0L, 0L);
  if (pid == 0) {
    if (have_pipe) {
      char c;
      close(pfd[1]);
      while (read(pfd[0], &c, 1) < 0 && errno == EINTR) {
      }
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(pa__handler_exe, pa__argv, pa__envp);
    _exit(127);
  }
  if (have_pipe) {
    if (pid > 0) prctl(PR_SET_PTRACER, (unsigned long)pid, 0, 0, 0);
    close(pfd[0]);
    write_all(pfd[1], "go", 1);
    close(pfd[1]);
  }
  if (pid < 0) return "clone_failed";
  uint64_t deadline = mono_ms() + HANDLER_TIMEOUT_MS;
  for (;;) {
    int status = 0;
    pid_t r = waitpid((pid_t)pid, &status, WNOHANG);
    if (r == (pid_t)pid) {
      *status_out = status;
      if (WIFEXITED(status)) return WEXITSTATUS(status) == 0 ? "exited_0" : "exited_nonzero";
      return "killed";
    }
    if (r < 0 && errno != EINTR) return "reaped_elsewhere"; /* a SIGCHLD handler took it: the files tell */
    if (mono_ms() > deadline) {
      kill((pid_t)pid, SIGKILL);
      waitpid((pid_t)pid, &status, 0);
      return "timeout";
    }
    sleep_ms(5);
  }
}

static void reset_and_raise(int sig, const siginfo_t *info) {
  signal(sig, SIG_DFL);
  /* A fault re-executes the faulting instruction on return; a sent signal (abort, kill) must be sent again. It stays
   * pending while this handler runs and is delivered on return. */
  if (info->si_code <= 0) syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), sig);
}

static void call_previous(int sig, siginfo_t *info, void *uc) {
  for (size_t i = 0; i < N_FATAL; i++) {
    if (fatal_signals[i] != sig) continue;
    struct sigaction *p = &pa__prev[i];
    if (p->sa_flags & SA_SIGINFO) {
      if (p->sa_sigaction) p->sa_sigaction(sig, info, uc);
    } else if (p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN) {
      p->sa_handler(sig);
    }
  }
}

static void on_fatal(int sig, siginfo_t *info, void *uc) {
  int saved_errno = errno;
  pid_t tid = (pid_t)syscall(SYS_gettid);
  int expected = 0;
  if (!atomic_compare_exchange_strong(&pa__handling, &expected, (int)tid)) {
    if (expected != (int)tid) {
      /* Another thread is writing the report and will end the process; give it the time it needs. */
      for (unsigned i = 0; i < HANDLER_TIMEOUT_MS / 100 + 50; i++) sleep_ms(100);
    }
    reset_and_raise(sig, info);
    errno = saved_errno;
    return;
  }
  uint64_t t0 = mono_ms();
  int fd = write_record_head(sig, info, tid);
  if (pa__handler_exe[0]) {
    int status = 0;
    const char *what = run_handler(uc, info, tid, &status);
    if (fd >= 0) {
      char b[256];
      size_t n = 0;
      pa__fmt_str(b, &n, sizeof b, "minidump_handler: ");
      pa__fmt_str(b, &n, sizeof b, what);
      pa__fmt_str(b, &n, sizeof b, "\nminidump_handler_status: ");
      pa__fmt_u64(b, &n, sizeof b, (unsigned)status);
      pa__fmt_str(b, &n, sizeof b, "\n");
      write_all(fd, b, n);
    }
  } else if (fd >= 0) {
    write_all(fd, "minidump_handler: none\n", 23);
  }
  if (fd >= 0) {
    char b[64];
    size_t n = 0;
    pa__fmt_str(b, &n, sizeof b, "handler_ms: ");
    pa__fmt_u64(b, &n, sizeof b, (unsigned long long)(mono_ms() - t0));
    pa__fmt_str(b, &n, sizeof b, "\nend\n");
    write_all(fd, b, n);
    fsync(fd);
    close(fd);
  }
  call_previous(sig, info, uc);
  reset_and_raise(sig, info);
  errno = saved_errno;
}

/* ---- set-up -------------------------------------------------------------------------------------------------------- */

static size_t altstack_size(void) {
  long min = sysconf(_SC_SIGSTKSZ);
  size_t size = min > 0 ? (size_t)min * 4 : 0;
  return size > ALTSTACK_MIN ? size : ALTSTACK_MIN;
}

static int install_altstack(void) {
  if (pa__altstack) return 0;
  size_t size = altstack_size();
  void *mem = malloc(size);
  if (!mem) return -ENOMEM;
  stack_t ss = {.ss_sp = mem, .ss_size = size, .ss_flags = 0};
  if (sigaltstack(&ss, NULL) < 0) {
    int e = errno;
    free(mem);
    return -e;
  }
  pa__altstack = mem;
  return 0;
}

static char *dup_concat(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  char *s = malloc(la + lb + 1);
  if (!s) return NULL;
  memcpy(s, a, la);
  memcpy(s + la, b, lb + 1);
  return s;
}

int pa_crash_enabled(void) { return pa__crash_ready; }

int pa_crash_init(const char *dir, const char *handler, const char *const *annotations, size_t n_annotations,
                  int allow_test_crashes, char *err, size_t errlen) {
  if (pa__crash_ready) {
    snprintf(err, errlen, "crash capture is already initialised");
    return -EALREADY;
  }
  if (!dir || !*dir || access(dir, W_OK) != 0) {
    snprintf(err, errlen, "crash directory '%s' is not a writable directory", dir ? dir : "");
    return -EINVAL;
  }
  if (n_annotations > PA_CRASH_MAX_ANNOTATIONS) {
    snprintf(err, errlen, "too many crash annotations (%zu, at most %d)", n_annotations, PA_CRASH_MAX_ANNOTATIONS);
    return -EINVAL;
  }
  for (size_t i = 0; i < n_annotations; i++) {
    const char *eq = strchr(annotations[i], '=');
    if (!eq || eq == annotations[i] || strchr(annotations[i], '\n')) {
      snprintf(err, errlen, "crash annotation '%.64s' is not key=value on one line", annotations[i]);
      return -EINVAL;
    }
  }
  if (handler && *handler) {
    if (access(handler, X_OK) != 0) {
      snprintf(err, errlen, "crash handler '%s' is not an executable file", handler);
      return -EINVAL;
    }
    if (snprintf(pa__handler_exe, sizeof pa__handler_exe, "%s", handler) >= (int)sizeof pa__handler_exe) {
      snprintf(err, errlen, "crash handler path is too long");
      return -EINVAL;
    }
  }
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  if (snprintf(pa__record_path, sizeof pa__record_path, "%s/record.txt", dir) >= (int)sizeof pa__record_path) {
    snprintf(err, errlen, "crash directory path is too long");
    pa__handler_exe[0] = '\0';
    return -EINVAL;
  }

  /* The handler's argv and the record's static part: built now, never at crash time. */
  size_t a = 0;
  char hexaddr[32];
  size_t hn = 0;
  pa__fmt_hex(hexaddr, &hn, sizeof hexaddr, (unsigned long long)(uintptr_t)&pa__exc_info);
  char *database = malloc(strlen(dir) + 32);
  if (database) sprintf(database, "%s/crashpad", dir);
  pa__argv[a++] = pa__handler_exe;
  pa__argv[a++] = database ? dup_concat("--database=", database) : NULL;
  free(database);
  for (size_t i = 0; i < n_annotations; i++) pa__argv[a++] = dup_concat("--annotation=", annotations[i]);
  pa__argv[a++] = strdup("--no-rate-limit");
  pa__argv[a++] = strdup("--no-periodic-tasks");
  pa__argv[a++] = strdup("--no-upload-gzip");
  pa__argv[a++] = dup_concat("--trace-parent-with-exception=", hexaddr);
  pa__argv[a] = NULL;
  size_t e = 0;
  const char *ld = getenv("LD_LIBRARY_PATH");
  pa__envp[e++] = strdup("LC_ALL=C");
  if (ld) pa__envp[e++] = dup_concat("LD_LIBRARY_PATH=", ld);
  pa__envp[e] = NULL;
  size_t cap = 64 + strlen(PA_HOST_VERSION);
  for (size_t i = 0; i < n_annotations; i++) cap += strlen(annotations[i]) + 16;
  pa__record_static = malloc(cap);
  int oom = !pa__record_static;
  for (size_t i = 1; i < a; i++) oom |= !pa__argv[i];
  for (size_t i = 0; i < e; i++) oom |= !pa__envp[i];
  if (oom) {
    snprintf(err, errlen, "out of memory");
    pa__handler_exe[0] = '\0';
    return -ENOMEM;
  }
  size_t n = 0;
  pa__fmt_str(pa__record_static, &n, cap, "host_version: " PA_HOST_VERSION "\n");
  for (size_t i = 0; i < n_annotations; i++) {
    pa__fmt_str(pa__record_static, &n, cap, "annotation: ");
    pa__fmt_str(pa__record_static, &n, cap, annotations[i]);
    pa__fmt_str(pa__record_static, &n, cap, "\n");
  }
  pa__record_static_len = n;

  /* Load libgcc's unwinder now: the first backtrace() call dlopens it, which is not signal-safe. */
  void *warm[4];
  (void)backtrace(warm, 4);

  int rc = install_altstack();
  if (rc) {
    snprintf(err, errlen, "cannot install the signal stack: %s", strerror(-rc));
    return rc;
  }
  pa__main_tid = (pid_t)syscall(SYS_gettid);
  pa__allow_test = allow_test_crashes;
  uv_mutex_init(&pa__test_lock);

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fatal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  /* Every fatal signal is blocked while one is handled: a second fault in the handler kills the process at once. */
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < N_FATAL; i++) sigaddset(&sa.sa_mask, fatal_signals[i]);
  for (size_t i = 0; i < N_FATAL; i++) {
    if (sigaction(fatal_signals[i], &sa, &pa__prev[i]) < 0) {
      snprintf(err, errlen, "cannot install the handler for %s: %s", pa__signal_name(fatal_signals[i]),
               strerror(errno));
      return -errno;
    }
  }
  pa__crash_ready = 1;
  return 0;
}

/* ---- threads ------------------------------------------------------------------------------------------------------- */

static void crash_now(int kind);

static void on_test_async(uv_async_t *h) {
  (void)h;
  int kind = atomic_load(&pa__test_kind);
  if (kind) crash_now(kind);
}

int pa_crash_thread_enter(uv_loop_t *loop) {
  int rc = install_altstack();
  if (!pa__crash_ready) return rc;
  atomic_store(&pa__libuv_tid, (int)syscall(SYS_gettid));
  if (pa__allow_test && loop) {
    uv_mutex_lock(&pa__test_lock);
    if (uv_async_init(loop, &pa__test_async, on_test_async) == 0) {
      /* Unreferenced: the test handle never keeps the loop alive at stop. */
      uv_unref((uv_handle_t *)&pa__test_async);
      pa__test_loop = loop;
      pa__test_live = 1;
    }
    uv_mutex_unlock(&pa__test_lock);
  }
  return rc;
}

void pa_crash_thread_leave(void) {
  if (pa__crash_ready) {
    uv_mutex_lock(&pa__test_lock);
    if (pa__test_live) {
      pa__test_live = 0;
      uv_close((uv_handle_t *)&pa__test_async, NULL);
      uv_run(pa__test_loop, UV_RUN_DEFAULT); /* runs the close callback; nothing else is alive any more */
      pa__test_loop = NULL;
    }
    uv_mutex_unlock(&pa__test_lock);
    atomic_store(&pa__libuv_tid, 0);
  }
  if (pa__altstack) {
    stack_t ss = {.ss_sp = NULL, .ss_size = 0, .ss_flags = SS_DISABLE};
    sigaltstack(&ss, NULL);
    free(pa__altstack);
    pa__altstack = NULL;
  }
}

/* ---- test crashes ---------------------------------------------------------------------------------------------------- */

static int *volatile pa__bad_pointer; /* NULL, read through a volatile so the compiler cannot see the fault */
static volatile size_t pa__depth_limit = SIZE_MAX;

__attribute__((noinline)) static size_t overflow(size_t depth) {
  volatile char frame[1024];
  frame[0] = (char)depth;
  if (depth >= pa__depth_limit) return frame[0];
  return overflow(depth + 1) + frame[0]; /* not a tail call: every level keeps its frame */
}

__attribute__((noinline)) static void crash_now(int kind) {
  switch (kind) {
  case PA_CRASH_SEGV: *pa__bad_pointer = 42; break;
  case PA_CRASH_ABORT: abort();
  case PA_CRASH_STACK_OVERFLOW: (void)overflow(0); break;
  default: break;
  }
}

int pa_crash_test(int kind, int thread) {
  if (!pa__crash_ready || !pa__allow_test) return -EPERM;
  if (kind != PA_CRASH_SEGV && kind != PA_CRASH_ABORT && kind != PA_CRASH_STACK_OVERFLOW) return -EINVAL;
  if (thread == PA_CRASH_THREAD_MAIN) {
    crash_now(kind);
    return 0;
  }
  if (thread != PA_CRASH_THREAD_LIBUV) return -EINVAL;
  int rc = -ESRCH;
  uv_mutex_lock(&pa__test_lock);
  if (pa__test_live) {
    atomic_store(&pa__test_kind, kind);
    rc = uv_async_send(&pa__test_async);
  }
  uv_mutex_unlock(&pa__test_lock);
  return rc;
}
