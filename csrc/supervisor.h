/* The supervisor (DESIGN §2, docs/architecture.md "Supervisor"): a small process without Python that holds the state
 * directory's instance lock, runs the worker (`pyagent-host --foreground`), restarts it with capped backoff, detects
 * crash loops, enforces optional RSS/CPU caps and records the reason for every restart in `state_dir/restarts.jsonl`.
 * It also swaps staged updates in, runs their probation and commits or rolls them back (update_swap.h,
 * docs/updates.md §3).
 *
 * The pure parts (settings, exit classification, crash-loop window, /proc parsing, the bounded restart log) are
 * declared here so the C unit tests can reach them; pa_supervisor_main is the process. */
#ifndef PA_SUPERVISOR_H
#define PA_SUPERVISOR_H

#include <stddef.h>
#include <stdint.h>

/* Exit codes of the supervisor process (documented in docs/architecture.md). */
enum {
  PA_SUP_EXIT_OK = 0,       /* stopped by SIGTERM/SIGINT, or the worker stopped on its own (agent.stop) */
  PA_SUP_EXIT_FAILURE = 1,  /* cannot create the state directory, spawn, … */
  PA_SUP_EXIT_USAGE = 2,    /* bad arguments, or a config file that does not parse */
  PA_SUP_EXIT_LOCKED = 3    /* another supervisor holds state_dir/pyagent.lock */
};

/* Exit codes of the worker the supervisor gives a meaning to (pyagent/runtime/worker.py, _control.py). */
enum {
  PA_WORKER_EXIT_CONFIG = 2,   /* bad config or a bundle that does not load: retried slowly (it can be fixed) */
  PA_WORKER_EXIT_REFUSED = 3,  /* enrollment refused: retried slowly too */
  PA_WORKER_EXIT_RESTART = 75, /* agent.restart: "restart me now" */
  PA_WORKER_EXIT_UPDATE = 76   /* an update was staged (STATE/updates/staged.json): swap it in and restart now */
};

#define PA_SUP_LOCK_FILE "pyagent.lock"
#define PA_SUP_RESTARTS_FILE "restarts.jsonl"
/* restarts.jsonl stays under this size: when an append would pass it, the oldest half of the records is dropped. */
#define PA_SUP_RESTARTS_MAX_BYTES (64 * 1024)
/* The CPU cap must be exceeded on this many consecutive checks (a start-up burst is not a runaway). */
#define PA_SUP_CPU_CHECKS 3
#define PA_SUP_CRASH_LOOP_MAX 1000

/* What `pyagent-host check-config --json` reports (the agent TOML is parsed by Python only). */
typedef struct pa_sup_settings_s {
  char *config;     /* absolute path of the agent config */
  char *state_dir;  /* absolute */
  int log_level;    /* PA_LOG_* */
  int config_ok;    /* 0: the config parsed but a bundle or agent config is bad (the worker will exit 2) */
  char *error;      /* the problem when !config_ok (NULL otherwise) */
  uint64_t max_rss_kb;      /* 0 = no cap */
  double max_cpu_percent;   /* percent of one core; 0 = no cap */
  uint64_t check_interval_ms;
  uint64_t restart_min_ms;
  uint64_t restart_max_ms;
  uint64_t stable_ms;
  unsigned crash_loop_count;
  uint64_t crash_loop_window_ms;
  uint64_t stop_timeout_ms;
  uint64_t probation_ms;    /* an update's worker must run this long after its healthy handshake (docs/updates.md) */
  uint64_t probation_handshake_ms; /* … and reach that handshake within this long after its start */
} pa_sup_settings_t;

#define PA_SUP_PROBATION_MS_DEFAULT 30000
#define PA_SUP_PROBATION_HANDSHAKE_MS_DEFAULT 120000

/* Parse the JSON printed by `check-config --json`. Returns 0, or -1 with a message in err naming the key. A document
 * with "ok": false and no settings (the file itself is bad) is an error whose message is the config error. */
int pa_sup_settings_parse(const char *json, size_t len, pa_sup_settings_t *s, char *err, size_t errcap);
void pa_sup_settings_free(pa_sup_settings_t *s);

/* What to do after a worker exit. */
typedef enum {
  PA_SUP_STOP = 0,      /* do not restart; the supervisor exits */
  PA_SUP_RESTART_NOW,   /* requested restart: no delay */
  PA_SUP_RESTART_BACKOFF,
  PA_SUP_RESTART_SLOW   /* config error / enrollment refused: wait the longest delay */
} pa_sup_action_t;

/* Classify a worker exit. `killed_for` is the cap the supervisor enforced ("rss_cap", "cpu_cap") or NULL; `stopping`
 * is set once the supervisor itself was told to stop. Returns the reason recorded in the log and restarts.jsonl:
 * "stopping", "stopped", "restart_requested", "update" (exit 76: restart now, no backoff), "config_error",
 * "enroll_refused", "exit", "crash" (a core-dumping signal), "signal", or killed_for. *abnormal is 1 when the exit counts towards crash-loop detection. */
const char *pa_sup_classify(int64_t exit_status, int term_signal, const char *killed_for, int stopping,
                            pa_sup_action_t *action, int *abnormal);

/* Crash-loop detection: the times of the last abnormal exits. */
typedef struct pa_sup_crashes_s {
  uint64_t at_ms[PA_SUP_CRASH_LOOP_MAX];
  unsigned n;  /* entries used, oldest first */
} pa_sup_crashes_t;

/* Record an abnormal exit at now_ms; returns 1 when `count` of them fell within the last window_ms. */
int pa_sup_crashes_note(pa_sup_crashes_t *c, uint64_t now_ms, unsigned count, uint64_t window_ms);

/* Parse /proc/PID/statm and /proc/PID/stat contents: resident set in pages, user+system CPU time in clock ticks. */
int pa_sup_parse_statm(const char *text, uint64_t *resident_pages);
int pa_sup_parse_stat(const char *text, uint64_t *cpu_ticks);

/* Append one line (no newline) to a bounded JSON-lines file: when the file would pass max_bytes, it is rewritten with
 * the newer half of its lines (to a temporary file, then renamed, so a reader never sees a torn file). */
int pa_sup_append_bounded(const char *path, const char *line, size_t max_bytes);
/* write(2) all of p (EINTR retried): 0, or -1 with errno set. */
int pa_sup_write_all(int fd, const char *p, size_t n);
/* The highest "seq" in a restarts.jsonl file (0 when there is none). */
uint64_t pa_sup_last_seq(const char *path);

/* The supervisor process: `pyagent-host [--config FILE]`. Returns the exit code. */
int pa_supervisor_main(int argc, char **argv);

#endif
