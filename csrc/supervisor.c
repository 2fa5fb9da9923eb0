/* The supervisor: one libuv loop, no Python, no threads. It reads its settings once from a short-lived
 * `pyagent-host check-config --json` (Python stays the only TOML parser), takes the instance lock, then runs the
 * worker and restarts it until told to stop.
 *
 * Staged updates (docs/updates.md §3; the file operations are in update_swap.c) hook in at four places, marked
 * "SEAM" below:
 *   - worker_executable(): STATE/host/current/pyagent-host when a host update is installed (and executable) and the
 *     installed binary is still the one it was swapped in over (STATE/host/installed.id), else the installed binary:
 *     an OS package upgrade is not shadowed by an older host update. Every worker gets PYAGENT_HOST_HOME=<directory
 *     of the installed binary>, so a host run from STATE/host/<version>/ finds the installed Python environment.
 *   - before_worker_start(): a staged update (STATE/updates/staged.json) is swapped in, or an interrupted swap,
 *     probation or rollback is finished (pa_upd_prepare); the probation timer starts with the worker.
 *   - on_probation(): polls STATE/updates/healthy until it holds this worker's pid (the worker's first handshake
 *     with its bundles loaded), for at most probation_handshake_ms; then probation_ms more of running commits the
 *     update. No healthy handshake in time rolls it back and restarts the worker on the previous version.
 *   - after_worker_exit(): any exit during probation (but a stop of the supervisor) rolls back and restarts at once,
 *     without backoff and outside the crash-loop count; exit 76 (an update was staged) restarts at once too. A
 *     rollback that fails (the link cannot be rewritten) leaves the new version in place: that exit takes the
 *     ordinary policy (backoff, crash-loop count), so a broken version on a read-only state cannot spin.
 * The signals, the lock, the caps and the restart log are unchanged. */
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <uv.h>

#include "backoff.h"
#include "log.h"
#include "update_swap.h"
#include "worker.h" /* PA_HOST_VERSION */

/* ---------------------------------------------------------------------------------------------------------------- */
/* The process                                                                                                      */

typedef struct pa__sup_s {
  uv_loop_t *loop;
  pa_sup_settings_t set;
  char exe[PATH_MAX];
  char host_exe[PATH_MAX];  /* STATE/host/current/pyagent-host */
  char restarts_path[PATH_MAX];
  int lock_fd;
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_timer_t restart_timer; /* the delay before the next start */
  uv_timer_t kill_timer;    /* SIGTERM sent: SIGKILL when it fires */
  uv_timer_t check_timer;   /* RSS/CPU caps */
  uv_timer_t stable_timer;  /* the worker has run stable_ms */
  uv_timer_t probation_timer; /* an update in probation: polls for `healthy`, then the verdict after probation_ms */
  int probation_healthy;    /* the worker in probation has marked itself healthy: the timer is now the verdict */
  pa_upd_t upd;             /* the update in probation */
  int in_probation;
  char rollback_failed_for[PA_UPD_VERSION_MAX + PA_UPD_NAME_MAX + 16]; /* the update whose rollback_failed is logged */
  int superseded_logged;    /* supervisor.host.superseded is logged (until a host update applies again) */
  uint64_t upd_seq;         /* of the last record in updates.jsonl */
  uv_process_t proc;
  int proc_open;            /* proc is initialised and not yet closed */
  int running;              /* proc is a live child */
  int pid;
  int stopping;
  const char *killed_for;   /* the cap enforced on the running worker, or NULL */
  char cap_detail[160];
  uint64_t started_ms;      /* uv_now() at the last spawn */
  uint64_t restarts;        /* since the supervisor started */
  uint64_t seq;             /* of the last record in restarts.jsonl */
  pa_backoff_t backoff;
  pa_sup_crashes_t crashes;
  /* the last exit, between the exit callback and the close callback */
  int64_t exit_status;
  int term_signal;
  /* cap sampling */
  long clk_tck;
  uint64_t page_kb;
  uint64_t last_ticks, last_sample_ms, rss_kb;
  int have_sample;
  unsigned cpu_over;
} pa__sup_t;

static void start_worker(pa__sup_t *s);
static void on_proc_closed(uv_handle_t *h);

static uint64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void iso_time(uint64_t ms, char *buf, size_t cap) {
  time_t t = (time_t)(ms / 1000);
  struct tm tm;
  gmtime_r(&t, &tm);
  snprintf(buf, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
           tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

/* SEAM (updates): the binary to run: STATE/host/current/pyagent-host when a host update is installed, that file is an
 * executable and the installed binary has not been replaced since the swap (pa_upd_host_applies: an OS package
 * upgrade wins over an older host update; the files stay, the next host update records the new binary), else the
 * installed binary. */
static const char *worker_executable(pa__sup_t *s) {
  struct stat st;
  int n = snprintf(s->host_exe, sizeof s->host_exe, "%s/host/" PA_UPD_LINK "/" PA_UPD_HOST_NAME, s->set.state_dir);
  if (n <= 0 || (size_t)n >= sizeof s->host_exe || stat(s->host_exe, &st) != 0 || !S_ISREG(st.st_mode) ||
      access(s->host_exe, X_OK) != 0)
    return s->exe;
  if (pa_upd_host_applies(s->set.state_dir, s->exe)) {
    s->superseded_logged = 0;
    return s->host_exe;
  }
  if (!s->superseded_logged) {
    char target[PATH_MAX] = "", qe[PATH_MAX + 8];
    pa_upd_t host = {.kind = "host", .name = PA_UPD_HOST_NAME};
    (void)pa_upd_link_target(s->set.state_dir, &host, target, sizeof target);
    pa_log(PA_LOG_WARNING, "supervisor.host.superseded", "version=%s installed=%s note=\"the installed host changed "
           "since this host update was swapped in (an OS package upgrade): the installed one runs\"",
           target[0] ? target : "-", pa_log_quote(qe, sizeof qe, s->exe));
    s->superseded_logged = 1;
  }
  return s->exe;
}

/* SEAM (updates): swap in a staged update, or finish what a killed supervisor left half done, before a spawn. The
 * probation timer starts once the worker runs (start_worker). */
static void before_worker_start(pa__sup_t *s) {
  pa_upd_outcome_t o = pa_upd_prepare(s->set.state_dir, s->exe, &s->upd_seq, &s->upd);
  s->in_probation = o != PA_UPD_IDLE;
}

/* The detail of a rollback caused by a worker exit: "exit code 2", "signal 11", "rss_cap rss_kb=…", … */
static void exit_detail(pa__sup_t *s, char *out, size_t cap) {
  if (s->killed_for) snprintf(out, cap, "%s%s%s", s->killed_for, s->cap_detail[0] ? " " : "", s->cap_detail);
  else if (s->term_signal) snprintf(out, cap, "signal %d", s->term_signal);
  else snprintf(out, cap, "exit code %" PRId64, s->exit_status);
}

/* Roll the update in probation back (the link to its previous version, a record, probation.json removed). 0, or -1
 * when it could not be done (the link cannot be rewritten: a read-only file system, no inodes, …): the new version
 * stays current and probation.json stays, so the next start continues the probation; the caller then treats the
 * exit as an ordinary one. The failure is logged once per update, not at every restart of a crash loop. */
static int rollback(pa__sup_t *s, const char *detail) {
  char err[PATH_MAX + 256], q[PATH_MAX + 300], qd[2 * sizeof s->cap_detail + 8];
  char which[sizeof s->rollback_failed_for];
  s->in_probation = 0;
  uv_timer_stop(&s->probation_timer);
  snprintf(which, sizeof which, "%s/%s/%s", s->upd.kind, s->upd.name, s->upd.version);
  if (pa_upd_rollback(s->set.state_dir, &s->upd_seq, &s->upd, detail, err, sizeof err) != 0) {
    if (strcmp(s->rollback_failed_for, which) != 0)
      pa_log(PA_LOG_ERROR, "supervisor.update.rollback_failed", "kind=%s name=%s version=%s pid=%d detail=%s error=%s",
             s->upd.kind, s->upd.name, s->upd.version, s->pid, pa_log_quote(qd, sizeof qd, detail),
             pa_log_quote(q, sizeof q, err));
    snprintf(s->rollback_failed_for, sizeof s->rollback_failed_for, "%s", which);
    return -1;
  }
  s->rollback_failed_for[0] = '\0';
  pa_log(PA_LOG_WARNING, "supervisor.update.rolled_back", "kind=%s name=%s version=%s previous=%s pid=%d detail=%s",
         s->upd.kind, s->upd.name, s->upd.version, s->upd.previous[0] ? s->upd.previous : "-", s->pid,
         pa_log_quote(q, sizeof q, detail));
  return 0;
}

static void close_all(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* Stop everything: uv_run returns once the handles are closed. Never called while the worker's handle is open. */
static void finish(pa__sup_t *s) {
  pa_log(PA_LOG_INFO, "supervisor.stopped", "restarts=%" PRIu64, s->restarts);
  uv_walk(s->loop, close_all, NULL);
}

static void kill_worker(pa__sup_t *s, int sig) {
  if (!s->running) return;
  int rc = uv_process_kill(&s->proc, sig);
  if (rc != 0 && rc != UV_ESRCH)
    pa_log(PA_LOG_ERROR, "supervisor.kill.failed", "pid=%d signal=%d error=%s", s->pid, sig, uv_strerror(rc));
}

static void on_kill_timeout(uv_timer_t *t) {
  pa__sup_t *s = t->data;
  if (!s->running) return;
  pa_log(PA_LOG_WARNING, "supervisor.worker.kill", "pid=%d stop_timeout_ms=%" PRIu64 " reason=%s", s->pid,
         s->set.stop_timeout_ms, s->stopping ? "stopping" : s->killed_for ? s->killed_for : "unknown");
  kill_worker(s, SIGKILL);
}

/* SIGTERM now, SIGKILL after stop_timeout_ms. */
static void terminate_worker(pa__sup_t *s) {
  kill_worker(s, SIGTERM);
  if (s->running && !uv_is_active((uv_handle_t *)&s->kill_timer))
    uv_timer_start(&s->kill_timer, on_kill_timeout, s->set.stop_timeout_ms, 0);
}

static void stop(pa__sup_t *s, int signum) {
  if (!s->stopping)
    pa_log(PA_LOG_INFO, "supervisor.stopping", "signal=%d worker_pid=%d", signum, s->running ? s->pid : 0);
  s->stopping = 1;
  uv_timer_stop(&s->restart_timer);
  if (s->running) terminate_worker(s);
  else if (!s->proc_open) finish(s);
  /* else: the worker has exited and its handle is closing; on_proc_closed finishes. */
}

static void on_signal(uv_signal_t *h, int signum) {
  pa__sup_t *s = h->data;
  if (signum == SIGHUP) {
    kill_worker(s, SIGHUP); /* the worker reopens its log; the supervisor logs to stderr only */
    return;
  }
  stop(s, signum);
}

/* ---- caps ---- */

static void enforce_cap(pa__sup_t *s, const char *which) {
  s->killed_for = which;
  pa_log(PA_LOG_WARNING, "supervisor.cap", "reason=%s pid=%d %s", which, s->pid, s->cap_detail);
  uv_timer_stop(&s->check_timer);
  terminate_worker(s);
}

static int sample(pa__sup_t *s, uint64_t *rss_kb, uint64_t *ticks) {
  char path[64], buf[1024];
  int rc = -1;
  snprintf(path, sizeof path, "/proc/%d/statm", s->pid);
  FILE *f = fopen(path, "re");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  uint64_t pages;
  if (pa_sup_parse_statm(buf, &pages) != 0) return -1;
  *rss_kb = pages * s->page_kb;
  snprintf(path, sizeof path, "/proc/%d/stat", s->pid);
  f = fopen(path, "re");
  if (!f) return -1;
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  if (pa_sup_parse_stat(buf, ticks) == 0) rc = 0;
  return rc;
}

static void on_check(uv_timer_t *t) {
  pa__sup_t *s = t->data;
  if (!s->running || s->killed_for || s->stopping) return;
  uint64_t rss_kb, ticks, now = uv_now(s->loop);
  if (sample(s, &rss_kb, &ticks) != 0) return; /* the worker is exiting; its exit callback follows */
  s->rss_kb = rss_kb;
  if (s->set.max_rss_kb && rss_kb > s->set.max_rss_kb) {
    snprintf(s->cap_detail, sizeof s->cap_detail, "rss_kb=%" PRIu64 " max_rss_kb=%" PRIu64, rss_kb,
             s->set.max_rss_kb);
    enforce_cap(s, "rss_cap");
    return;
  }
  if (s->set.max_cpu_percent > 0 && s->have_sample && now > s->last_sample_ms) {
    double pct = (double)(ticks - s->last_ticks) * 1000.0 / (double)s->clk_tck / (double)(now - s->last_sample_ms) *
                 100.0;
    s->cpu_over = pct > s->set.max_cpu_percent ? s->cpu_over + 1 : 0;
    if (s->cpu_over >= PA_SUP_CPU_CHECKS) {
      snprintf(s->cap_detail, sizeof s->cap_detail, "cpu_percent=%.1f max_cpu_percent=%.1f checks=%d", pct,
               s->set.max_cpu_percent, PA_SUP_CPU_CHECKS);
      enforce_cap(s, "cpu_cap");
      return;
    }
  }
  s->last_ticks = ticks;
  s->last_sample_ms = now;
  s->have_sample = 1;
}

/* ---- restarts ---- */

/* A worker that ran stable_ms resets the backoff. (An update's verdict is on_probation's: it needs the worker's own
 * `healthy` mark, not only time.) */
static void on_stable(uv_timer_t *t) {
  pa__sup_t *s = t->data;
  pa_backoff_reset(&s->backoff);
  pa_log(PA_LOG_DEBUG, "supervisor.worker.stable", "pid=%d stable_ms=%" PRIu64, s->pid, s->set.stable_ms);
}

static void on_restart_timer(uv_timer_t *t) { start_worker(t->data); }

#define PA__NOT_HEALTHY "no healthy handshake within probation_handshake_ms"
#define PA__HEALTH_POLL_MS 200

static void commit(pa__sup_t *s) {
  char err[PATH_MAX + 256], q[PATH_MAX + 300];
  s->in_probation = 0;
  if (pa_upd_commit(s->set.state_dir, &s->upd_seq, &s->upd, err, sizeof err) != 0) {
    pa_log(PA_LOG_ERROR, "supervisor.update.commit_failed", "kind=%s name=%s version=%s error=%s", s->upd.kind,
           s->upd.name, s->upd.version, pa_log_quote(q, sizeof q, err));
    return;
  }
  s->rollback_failed_for[0] = '\0';
  pa_log(PA_LOG_INFO, "supervisor.update.committed", "kind=%s name=%s version=%s previous=%s pid=%d", s->upd.kind,
         s->upd.name, s->upd.version, s->upd.previous[0] ? s->upd.previous : "-", s->pid);
}

/* SEAM (updates): the probation. Phase 1, every PA__HEALTH_POLL_MS: has the worker marked itself healthy (its pid in
 * STATE/updates/healthy)? Yes → phase 2: the verdict probation_ms later, commit unless it exited meanwhile (then
 * after_worker_exit rolls back). Not within probation_handshake_ms → roll back. Waiting for the handshake rather
 * than judging at a fixed time keeps a slow start (a busy machine, ten agents restarting at once, an endpoint that
 * is briefly away) from failing a good version, while "no crash for N seconds" still means N seconds of serving. */
static void on_probation(uv_timer_t *t) {
  pa__sup_t *s = t->data;
  if (!s->in_probation || !s->running || s->stopping) return; /* an exit is on its way: after_worker_exit decides */
  if (s->probation_healthy) {
    commit(s);
    return;
  }
  long healthy = pa_upd_read_healthy(s->set.state_dir);
  uint64_t waited = uv_now(s->loop) - s->started_ms;
  if (healthy == s->pid) {
    s->probation_healthy = 1;
    uv_timer_stop(&s->probation_timer);
    pa_log(PA_LOG_INFO, "supervisor.update.healthy", "kind=%s name=%s version=%s pid=%d after_ms=%" PRIu64
           " probation_ms=%" PRIu64, s->upd.kind, s->upd.name, s->upd.version, s->pid, waited, s->set.probation_ms);
    uv_timer_start(&s->probation_timer, on_probation, s->set.probation_ms, 0);
    return;
  }
  if (waited < s->set.probation_handshake_ms) return; /* the poll repeats */
  pa_log(PA_LOG_WARNING, "supervisor.update.unhealthy", "pid=%d healthy_pid=%ld probation_handshake_ms=%" PRIu64,
         s->pid, healthy, s->set.probation_handshake_ms);
  /* The worker on the new version is stopped; its exit restarts it at once on the previous one — or, when the
   * rollback failed, on the same version after the ordinary backoff (reason "unhealthy", a crash-loop exit). */
  s->killed_for = rollback(s, PA__NOT_HEALTHY) == 0 ? "rolled_back" : "unhealthy";
  snprintf(s->cap_detail, sizeof s->cap_detail, "%s", PA__NOT_HEALTHY);
  uv_timer_stop(&s->check_timer);
  terminate_worker(s);
}

static uint64_t backoff_delay(pa__sup_t *s) {
  uint64_t ceiling = pa_backoff_ceiling(&s->backoff);
  (void)pa_backoff_next(&s->backoff);
  /* Half fixed, half random: always some delay (a crashing worker must not spin), some jitter (fleet-wide
   * restarts after a shared cause do not all land at once). */
  return ceiling / 2 + (uint64_t)(pa_backoff_unit(&s->backoff) * (double)(ceiling - ceiling / 2));
}

static void record_restart(pa__sup_t *s, const char *reason, uint64_t uptime_ms, uint64_t delay_ms, int loop) {
  char when[80];
  uint64_t now = wall_ms();
  iso_time(now, when, sizeof when);
  json_t *rec = json_object();
  json_object_set_new(rec, "seq", json_integer((json_int_t)++s->seq));
  json_object_set_new(rec, "time", json_string(when));
  json_object_set_new(rec, "unix_ms", json_integer((json_int_t)now));
  json_object_set_new(rec, "reason", json_string(reason));
  json_object_set_new(rec, "exit_code", s->term_signal ? json_null() : json_integer(s->exit_status));
  json_object_set_new(rec, "signal", s->term_signal ? json_integer(s->term_signal) : json_null());
  json_object_set_new(rec, "detail", json_string(s->killed_for ? s->cap_detail : ""));
  json_object_set_new(rec, "worker_pid", json_integer(s->pid));
  json_object_set_new(rec, "uptime_ms", json_integer((json_int_t)uptime_ms));
  json_object_set_new(rec, "delay_ms", json_integer((json_int_t)delay_ms));
  json_object_set_new(rec, "crash_loop", json_boolean(loop));
  json_object_set_new(rec, "restarts", json_integer((json_int_t)s->restarts));
  json_object_set_new(rec, "host_version", json_string(PA_HOST_VERSION));
  char *line = json_dumps(rec, JSON_COMPACT);
  json_decref(rec);
  int rc = line ? pa_sup_append_bounded(s->restarts_path, line, PA_SUP_RESTARTS_MAX_BYTES) : -ENOMEM;
  free(line);
  if (rc != 0)
    pa_log(PA_LOG_ERROR, "supervisor.restarts.write_failed", "path=%s error=\"%s\"", s->restarts_path,
           strerror(-rc));
}

/* SEAM (updates): any exit of a worker in probation rolls back here, before the restart policy; the worker then
 * restarts at once on the previous version (no backoff, not a crash-loop exit). When the rollback fails the new
 * version is still current: the exit is judged like any other (backoff, crash-loop count), else a version that
 * crashes at once would be restarted in a tight loop. */
static void after_worker_exit(pa__sup_t *s, const char *reason, pa_sup_action_t action, int abnormal,
                              uint64_t uptime_ms) {
  int rolled_back = s->killed_for && strcmp(s->killed_for, "rolled_back") == 0; /* by on_probation */
  if (s->in_probation) {
    char detail[sizeof s->cap_detail];
    exit_detail(s, detail, sizeof detail);
    if (rollback(s, detail) == 0) {
      rolled_back = 1;
      s->killed_for = "rolled_back";
      snprintf(s->cap_detail, sizeof s->cap_detail, "%s", detail);
    }
  }
  if (rolled_back) {
    reason = "rolled_back";
    abnormal = 0;
    /* A worker that stopped on its own (agent.stop, exit 0) is not started again, on any version. */
    if (action != PA_SUP_STOP) action = PA_SUP_RESTART_NOW;
  }
  if (action == PA_SUP_STOP) {
    if (strcmp(reason, "stopped") == 0)
      pa_log(PA_LOG_INFO, "supervisor.worker.stopped", "pid=%d note=\"the worker stopped on its own (exit 0); "
             "not restarting\"", s->pid);
    finish(s);
    return;
  }
  s->restarts++;
  uint64_t now = uv_now(s->loop);
  int loop = abnormal && pa_sup_crashes_note(&s->crashes, now, s->set.crash_loop_count, s->set.crash_loop_window_ms);
  uint64_t delay;
  if (loop) {
    pa_log(PA_LOG_ERROR, "supervisor.crash_loop", "exits=%u window_ms=%" PRIu64 " delay_ms=%" PRIu64
           " last_reason=%s", s->crashes.n, s->set.crash_loop_window_ms, s->set.restart_max_ms, reason);
    s->backoff.attempt = 64; /* stay at the longest delay until a stable run resets it */
    delay = s->set.restart_max_ms;
  } else if (rolled_back) {
    delay = 0;
  } else if (action == PA_SUP_RESTART_NOW) {
    /* A worker that asks for a restart right after starting would spin: it gets the backoff instead — unless it
     * exited 76 with an update staged, which the next start swaps in. */
    char staged[PATH_MAX];
    int update_staged = strcmp(reason, "update") == 0 &&
                        snprintf(staged, sizeof staged, "%s/" PA_UPD_DIR "/" PA_UPD_STAGED, s->set.state_dir) <
                            (int)sizeof staged &&
                        access(staged, F_OK) == 0;
    delay = uptime_ms < s->set.restart_min_ms && !update_staged ? backoff_delay(s) : 0;
  } else if (action == PA_SUP_RESTART_SLOW) {
    delay = s->set.restart_max_ms; /* a config can be fixed: keep trying, slowly */
  } else {
    delay = backoff_delay(s);
  }
  char detail[200] = "";
  if (s->killed_for) snprintf(detail, sizeof detail, " %s", s->cap_detail);
  pa_log(abnormal ? PA_LOG_WARNING : PA_LOG_INFO, "supervisor.restart",
         "reason=%s exit_code=%" PRId64 " signal=%d pid=%d uptime_ms=%" PRIu64 " delay_ms=%" PRIu64
         " crash_loop=%d restarts=%" PRIu64 "%s", reason, s->term_signal ? (int64_t)-1 : s->exit_status,
         s->term_signal, s->pid, uptime_ms, delay, loop, s->restarts, detail);
  record_restart(s, reason, uptime_ms, delay, loop);
  uv_timer_start(&s->restart_timer, on_restart_timer, delay, 0);
}

static void on_proc_closed(uv_handle_t *h) {
  pa__sup_t *s = h->data;
  s->proc_open = 0;
  if (s->stopping) {
    finish(s);
    return;
  }
  uint64_t uptime = uv_now(s->loop) - s->started_ms;
  pa_sup_action_t action;
  int abnormal;
  const char *reason = pa_sup_classify(s->exit_status, s->term_signal, s->killed_for, 0, &action, &abnormal);
  after_worker_exit(s, reason, action, abnormal, uptime);
}

static void on_worker_exit(uv_process_t *p, int64_t exit_status, int term_signal) {
  pa__sup_t *s = p->data;
  s->running = 0;
  s->exit_status = exit_status;
  s->term_signal = term_signal;
  uv_timer_stop(&s->kill_timer);
  uv_timer_stop(&s->check_timer);
  uv_timer_stop(&s->stable_timer);
  uv_timer_stop(&s->probation_timer);
  pa_log(s->stopping || (exit_status == 0 && !term_signal) ? PA_LOG_INFO : PA_LOG_WARNING, "supervisor.worker.exited",
         "pid=%d exit_code=%" PRId64 " signal=%d uptime_ms=%" PRIu64, s->pid, term_signal ? (int64_t)-1 : exit_status,
         term_signal, uv_now(s->loop) - s->started_ms);
  uv_close((uv_handle_t *)p, on_proc_closed);
}

static void start_worker(pa__sup_t *s) {
  if (s->stopping) return;
  before_worker_start(s);
  char *args[] = {(char *)worker_executable(s), "--foreground", "--config", s->set.config, NULL};
  uv_stdio_container_t stdio[3];
  for (int i = 0; i < 3; i++) {
    stdio[i].flags = UV_INHERIT_FD;
    stdio[i].data.fd = i;
  }
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.exit_cb = on_worker_exit;
  o.file = args[0];
  o.args = args;
  o.stdio_count = 3;
  o.stdio = stdio;
  s->killed_for = NULL;
  s->cap_detail[0] = '\0';
  s->have_sample = 0;
  s->cpu_over = 0;
  s->rss_kb = 0;
  s->exit_status = 0;
  s->term_signal = 0;
  s->started_ms = uv_now(s->loop);
  s->proc.data = s;
  int rc = uv_spawn(s->loop, &s->proc, &o);
  s->proc_open = 1;
  if (rc != 0) {
    /* Treated like a worker that exited at once with a failure: logged, recorded, retried with backoff. */
    char q[PATH_MAX + 8];
    pa_log(PA_LOG_ERROR, "supervisor.spawn.failed", "exe=%s error=\"%s\"", pa_log_quote(q, sizeof q, args[0]),
           uv_strerror(rc));
    s->pid = 0;
    s->exit_status = 127;
    s->killed_for = "spawn_failed";
    snprintf(s->cap_detail, sizeof s->cap_detail, "error=\"%s\"", uv_strerror(rc));
    uv_close((uv_handle_t *)&s->proc, on_proc_closed);
    return;
  }
  s->running = 1;
  s->pid = s->proc.pid;
  char qe[PATH_MAX + 8], qc[PATH_MAX + 8];
  pa_log(PA_LOG_INFO, "supervisor.worker.started", "pid=%d exe=%s config=%s", s->pid,
         pa_log_quote(qe, sizeof qe, args[0]), pa_log_quote(qc, sizeof qc, s->set.config));
  if (s->set.stable_ms) uv_timer_start(&s->stable_timer, on_stable, s->set.stable_ms, 0);
  if (s->in_probation) {
    pa_log(PA_LOG_INFO, "supervisor.update.probation", "kind=%s name=%s version=%s previous=%s pid=%d probation_ms=%"
           PRIu64 " probation_handshake_ms=%" PRIu64, s->upd.kind, s->upd.name, s->upd.version,
           s->upd.previous[0] ? s->upd.previous : "-", s->pid, s->set.probation_ms, s->set.probation_handshake_ms);
    s->probation_healthy = 0;
    uv_timer_start(&s->probation_timer, on_probation, PA__HEALTH_POLL_MS, PA__HEALTH_POLL_MS);
  }
  if (s->set.max_rss_kb || s->set.max_cpu_percent > 0)
    uv_timer_start(&s->check_timer, on_check, s->set.check_interval_ms, s->set.check_interval_ms);
}

/* ---- start-up: settings, state directory, lock ---- */

typedef struct pa__loader_s {
  uv_process_t proc;
  uv_pipe_t out;
  uv_timer_t timer;
  char *buf;
  size_t len, cap;
  int too_big;
  int64_t status;
  int term_signal;
} pa__loader_t;

#define PA__SETTINGS_MAX (1 << 20)
#define PA__SETTINGS_TIMEOUT_MS 120000

static void loader_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  pa__loader_t *l = h->data;
  if (l->cap - l->len < 4096) {
    size_t cap = l->cap ? l->cap * 2 : 8192;
    char *bigger = cap <= PA__SETTINGS_MAX + 8192 ? realloc(l->buf, cap) : NULL;
    if (bigger) {
      l->buf = bigger;
      l->cap = cap;
    }
  }
  *b = uv_buf_init(l->buf ? l->buf + l->len : NULL, l->buf ? (unsigned)(l->cap - l->len - 1) : 0);
}

static void loader_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  (void)b;
  pa__loader_t *l = st->data;
  if (n > 0) {
    l->len += (size_t)n;
    if (l->len > PA__SETTINGS_MAX) l->too_big = 1;
  } else if (n < 0) {
    if (n != UV_EOF) l->too_big = 1; /* UV_ENOBUFS: no buffer could be made */
    uv_close((uv_handle_t *)st, NULL);
  }
}

static void loader_exit(uv_process_t *p, int64_t status, int term_signal) {
  pa__loader_t *l = p->data;
  l->status = status;
  l->term_signal = term_signal;
  uv_close((uv_handle_t *)p, NULL);
  uv_close((uv_handle_t *)&l->timer, NULL);
}

static void loader_timeout(uv_timer_t *t) {
  pa__loader_t *l = t->data;
  pa_log(PA_LOG_ERROR, "supervisor.settings.timeout", "timeout_ms=%d", PA__SETTINGS_TIMEOUT_MS);
  uv_process_kill(&l->proc, SIGKILL);
}

/* Run `EXE check-config --json --no-bundles [--config FILE]`; parse what it prints. Returns an exit code. */
static int load_settings(pa__sup_t *s, const char *config_arg) {
  pa__loader_t l;
  memset(&l, 0, sizeof l);
  /* --no-bundles: a bundle that fails (or crashes) at import is the worker's problem, retried by the supervisor;
   * it must not keep the supervisor from starting. */
  char *args[7] = {s->exe, "check-config", "--json", "--no-bundles", NULL, NULL, NULL};
  if (config_arg) {
    args[4] = "--config";
    args[5] = (char *)config_arg;
  }
  uv_pipe_init(s->loop, &l.out, 0);
  l.out.data = l.proc.data = l.timer.data = &l;
  uv_stdio_container_t stdio[3];
  stdio[0].flags = UV_IGNORE;
  stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[1].data.stream = (uv_stream_t *)&l.out;
  stdio[2].flags = UV_INHERIT_FD; /* the config error, as the worker words it, goes to our stderr */
  stdio[2].data.fd = 2;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.exit_cb = loader_exit;
  o.file = s->exe;
  o.args = args;
  o.stdio_count = 3;
  o.stdio = stdio;
  int rc = uv_spawn(s->loop, &l.proc, &o);
  if (rc != 0) {
    fprintf(stderr, "pyagent-host: cannot run %s check-config: %s\n", s->exe, uv_strerror(rc));
    uv_close((uv_handle_t *)&l.proc, NULL);
    uv_close((uv_handle_t *)&l.out, NULL);
    uv_run(s->loop, UV_RUN_DEFAULT);
    return PA_SUP_EXIT_FAILURE;
  }
  uv_timer_init(s->loop, &l.timer);
  uv_timer_start(&l.timer, loader_timeout, PA__SETTINGS_TIMEOUT_MS, 0);
  uv_read_start((uv_stream_t *)&l.out, loader_alloc, loader_read);
  uv_run(s->loop, UV_RUN_DEFAULT); /* until the child exited and its output is read */
  int code = PA_SUP_EXIT_OK;
  char err[1024];
  if (l.term_signal || (l.status != 0 && l.status != PA_WORKER_EXIT_CONFIG) || l.too_big || !l.buf) {
    fprintf(stderr, "pyagent-host: %s check-config --json failed (exit code %" PRId64 ", signal %d)\n", s->exe,
            l.status, l.term_signal);
    code = PA_SUP_EXIT_FAILURE;
  } else if (pa_sup_settings_parse(l.buf, l.len, &s->set, err, sizeof err) != 0) {
    fprintf(stderr, "pyagent-host: not starting: %s\n", err);
    code = l.status == PA_WORKER_EXIT_CONFIG ? PA_SUP_EXIT_USAGE : PA_SUP_EXIT_FAILURE;
  }
  free(l.buf);
  return code;
}

static int mkdirs(const char *path) {
  char buf[PATH_MAX];
  if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return -ENAMETOOLONG;
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      char c = *p;
      *p = '\0';
      if (mkdir(buf, 0700) != 0 && errno != EEXIST) return -errno;
      *p = c;
      if (!c) break;
    }
  }
  return 0;
}

/* flock(2) on STATE/pyagent.lock, held for the supervisor's life (the descriptor is close-on-exec: the worker does
 * not hold it, and dies with the supervisor through PR_SET_PDEATHSIG, see main.c). Returns a supervisor exit code. */
static int take_lock(pa__sup_t *s) {
  char path[PATH_MAX];
  if (snprintf(path, sizeof path, "%s/%s", s->set.state_dir, PA_SUP_LOCK_FILE) >= (int)sizeof path) {
    fprintf(stderr, "pyagent-host: state directory path too long: %s\n", s->set.state_dir);
    return PA_SUP_EXIT_FAILURE;
  }
  int rc = mkdirs(s->set.state_dir);
  if (rc != 0) {
    fprintf(stderr, "pyagent-host: cannot create the state directory %s: %s\n", s->set.state_dir, strerror(-rc));
    return PA_SUP_EXIT_FAILURE;
  }
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    fprintf(stderr, "pyagent-host: cannot open the lock file %s: %s\n", path, strerror(errno));
    return PA_SUP_EXIT_FAILURE;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    if (e != EWOULDBLOCK) {
      fprintf(stderr, "pyagent-host: cannot lock %s: %s\n", path, strerror(e));
      close(fd);
      return PA_SUP_EXIT_FAILURE;
    }
    char pid[32] = "";
    ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
    pid[n > 0 ? n : 0] = '\0';
    pid[strcspn(pid, "\n")] = '\0';
    close(fd);
    fprintf(stderr, "pyagent-host: another supervisor (pid %s) holds the lock %s: not starting (exit code %d)\n",
            *pid ? pid : "unknown", path, PA_SUP_EXIT_LOCKED);
    pa_log(PA_LOG_ERROR, "supervisor.locked", "lock=%s holder_pid=%s", path, *pid ? pid : "unknown");
    return PA_SUP_EXIT_LOCKED;
  }
  char pid[32];
  int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
  if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n)
    pa_log(PA_LOG_WARNING, "supervisor.lock.pid_not_written", "lock=%s error=\"%s\"", path, strerror(errno));
  s->lock_fd = fd;
  return PA_SUP_EXIT_OK;
}

static const char *const pa__sup_usage =
    "usage: pyagent-host [--config FILE]            run the supervisor (it runs and restarts the worker)\n"
    "       pyagent-host --foreground [--config FILE]   run the worker alone\n"
    "       pyagent-host --help                      all commands\n";

int pa_supervisor_main(int argc, char **argv) {
  const char *config_arg = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--config") == 0 && i + 1 < argc && argv[i + 1][0]) {
      config_arg = argv[++i];
    } else if (strncmp(argv[i], "--config=", 9) == 0 && argv[i][9]) {
      config_arg = argv[i] + 9;
    } else {
      fprintf(stderr, "pyagent-host: %s '%s'\n%s", strncmp(argv[i], "--config", 8) == 0 ? "--config needs a FILE:"
              : "unknown argument", argv[i], pa__sup_usage);
      return PA_SUP_EXIT_USAGE;
    }
  }
  pa__sup_t *s = calloc(1, sizeof *s);
  if (!s) return PA_SUP_EXIT_FAILURE;
  s->lock_fd = -1;
  int code = PA_SUP_EXIT_FAILURE;
  size_t exe_len = sizeof s->exe;
  uv_loop_t loop;
  if (uv_loop_init(&loop) != 0) {
    free(s);
    return PA_SUP_EXIT_FAILURE;
  }
  s->loop = &loop;
  if (uv_exepath(s->exe, &exe_len) != 0) {
    fprintf(stderr, "pyagent-host: cannot find its own executable\n");
    goto out;
  }
#ifdef PA_SUPERVISOR_WORKER_NAME
  /* A separate supervisor binary (docs/architecture.md, "Supervisor": memory) runs the worker installed next to it. */
  char *slash = strrchr(s->exe, '/');
  if (!slash || (size_t)(slash + 1 - s->exe) + sizeof PA_SUPERVISOR_WORKER_NAME > sizeof s->exe) goto out;
  memcpy(slash + 1, PA_SUPERVISOR_WORKER_NAME, sizeof PA_SUPERVISOR_WORKER_NAME);
#endif
  code = load_settings(s, config_arg);
  if (code != PA_SUP_EXIT_OK) goto out;
  pa_log_set_level(s->set.log_level);
  code = take_lock(s);
  if (code != PA_SUP_EXIT_OK) goto out;
  snprintf(s->restarts_path, sizeof s->restarts_path, "%s/%s", s->set.state_dir, PA_SUP_RESTARTS_FILE);
  s->seq = pa_sup_last_seq(s->restarts_path);
  s->clk_tck = sysconf(_SC_CLK_TCK);
  if (s->clk_tck <= 0) s->clk_tck = 100;
  long page = sysconf(_SC_PAGESIZE);
  s->page_kb = page > 0 ? (uint64_t)page / 1024 : 4;
  pa_backoff_init(&s->backoff, s->set.restart_min_ms, s->set.restart_max_ms,
                  ((uint64_t)getpid() << 32) ^ uv_hrtime());
  /* The workers learn who supervises them (main.c: PR_SET_PDEATHSIG). */
  char pid[32];
  snprintf(pid, sizeof pid, "%ld", (long)getpid());
  setenv("PYAGENT_SUPERVISOR_PID", pid, 1);
  /* A host installed by an update (STATE/host/<version>/pyagent-host) uses the installed one's Python (embed.c). */
  char home[PATH_MAX];
  snprintf(home, sizeof home, "%s", s->exe);
  char *home_end = strrchr(home, '/');
  if (home_end) {
    *home_end = '\0';
    setenv("PYAGENT_HOST_HOME", home[0] ? home : "/", 1);
  }
  s->upd_seq = pa_upd_last_seq(s->set.state_dir);

  uv_signal_t *sigs[] = {&s->sig_term, &s->sig_int, &s->sig_hup};
  int signums[] = {SIGTERM, SIGINT, SIGHUP};
  for (int i = 0; i < 3; i++) {
    uv_signal_init(&loop, sigs[i]);
    sigs[i]->data = s;
    uv_signal_start(sigs[i], on_signal, signums[i]);
  }
  uv_timer_t *timers[] = {&s->restart_timer, &s->kill_timer, &s->check_timer, &s->stable_timer, &s->probation_timer};
  for (int i = 0; i < 5; i++) {
    uv_timer_init(&loop, timers[i]);
    timers[i]->data = s;
  }
  char qc[PATH_MAX + 8], qs[PATH_MAX + 8];
  pa_log(PA_LOG_INFO, "supervisor.started",
         "pid=%ld version=%s config=%s state_dir=%s max_rss_kb=%" PRIu64 " max_cpu_percent=%.1f", (long)getpid(),
         PA_HOST_VERSION, pa_log_quote(qc, sizeof qc, s->set.config), pa_log_quote(qs, sizeof qs, s->set.state_dir),
         s->set.max_rss_kb, s->set.max_cpu_percent);
  if (!s->set.config_ok) {
    char qe[1024];
    pa_log(PA_LOG_WARNING, "supervisor.config_invalid",
           "error=%s note=\"the worker will fail; it is retried every restart_max_ms until the config is fixed\"",
           pa_log_quote(qe, sizeof qe, s->set.error));
  }
  start_worker(s);
  uv_run(&loop, UV_RUN_DEFAULT);
  code = PA_SUP_EXIT_OK;
out:
  uv_walk(&loop, close_all, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) pa_log(PA_LOG_WARNING, "supervisor.loop.busy", "note=\"handles left open\"");
  if (s->lock_fd >= 0) close(s->lock_fd);
  pa_sup_settings_free(&s->set);
  free(s);
  return code;
}
