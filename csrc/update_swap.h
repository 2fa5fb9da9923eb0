/* Staged updates, the supervisor's file operations (docs/updates.md §3): swap a staged version in by pointing a
 * `current` symlink at it, commit or roll back after the probation, and record every step in
 * STATE/updates/updates.jsonl. No libuv, no processes: the supervisor (supervisor.c) decides when, these functions
 * change the files, and the C unit tests drive them on a temporary directory.
 *
 * Files (STATE is the agent's state directory):
 *   STATE/updates/staged.json      written by the updater: {"kind", "name", "version", "dir", "rollout"}
 *   STATE/updates/probation.json   written here at the swap: {"kind", "name", "version", "previous", "rollout",
 *                                  "unix_ms"}
 *   STATE/updates/healthy          written by the worker in probation once it is healthy: its pid
 *   STATE/updates/updates.jsonl    written here only (bounded like restarts.jsonl)
 *   STATE/bundles/<name>/current -> "<version>"   (a bundle)      STATE/host/current -> "<version>"   (the host)
 *   STATE/host/installed.id        written here at a host swap: the identity of the installed binary then
 *
 * Crash safety: every step is one atomic file operation (rename(2), unlink(2), one append), in an order that leaves
 * a runnable state at every point. pa_upd_prepare() finds out where a killed supervisor stopped and finishes the job:
 * staged.json and probation.json both present → the swap is redone with the recorded `previous`; probation.json
 * alone with the link on the new version → the probation continues; probation.json alone with the link elsewhere →
 * an interrupted rollback is finished. */
#ifndef PA_UPDATE_SWAP_H
#define PA_UPDATE_SWAP_H

#include <stddef.h>
#include <stdint.h>

#define PA_UPD_DIR "updates"
#define PA_UPD_STAGED "staged.json"
#define PA_UPD_PROBATION "probation.json"
#define PA_UPD_HEALTHY "healthy"
#define PA_UPD_LOG "updates.jsonl"
#define PA_UPD_LINK "current"
#define PA_UPD_HOST_NAME "pyagent-host" /* the "name" of a host update; also the executable's file name */
#define PA_UPD_INSTALLED_ID "installed.id" /* STATE/host/installed.id: see pa_upd_host_applies() */
/* updates.jsonl stays under this size (pa_sup_append_bounded). */
#define PA_UPD_LOG_MAX_BYTES (64 * 1024)
/* staged.json / probation.json larger than this are refused. */
#define PA_UPD_JSON_MAX 16384
#define PA_UPD_NAME_MAX 64
#define PA_UPD_VERSION_MAX 64
#define PA_UPD_ROLLOUT_MAX 128

typedef struct pa_upd_s {
  char kind[8];                          /* "bundle" or "host" */
  char name[PA_UPD_NAME_MAX + 1];        /* bundle name; "pyagent-host" for the host */
  char version[PA_UPD_VERSION_MAX + 1];
  char previous[PA_UPD_VERSION_MAX + 1]; /* the link's target before the swap; "" when there was none */
  char rollout[PA_UPD_ROLLOUT_MAX + 1];
  int has_rollout;                       /* 0: "rollout" is null */
  uint64_t unix_ms;                      /* when the swap happened (probation.json) */
} pa_upd_t;

/* What pa_upd_prepare() found and did. */
typedef enum {
  PA_UPD_IDLE = 0,       /* no update in progress: the worker starts on its current version */
  PA_UPD_SWAPPED,        /* a staged update was swapped in (or a half-done swap redone): probation starts */
  PA_UPD_CONTINUED       /* probation.json was there: the probation continues (fresh timer) */
} pa_upd_outcome_t;

/* A bundle name: [A-Za-z_][A-Za-z0-9_]*, at most PA_UPD_NAME_MAX bytes. */
int pa_upd_valid_bundle_name(const char *s);
/* A version used as a directory name: 1..PA_UPD_VERSION_MAX printable ASCII bytes without '/', '\\', whitespace or
 * "..", not starting with '.', not "current". */
int pa_upd_valid_version(const char *s);

/* Read STATE/updates/staged.json or probation.json. 1 read and valid; 0 absent; -1 invalid (err says why; what could
 * be read of kind/name/version is left in *u for the record). */
int pa_upd_read_staged(const char *state_dir, pa_upd_t *u, char *err, size_t errcap);
int pa_upd_read_probation(const char *state_dir, pa_upd_t *u, char *err, size_t errcap);

/* The directory holding the versions and the link: STATE/bundles/<name> or STATE/host. 0 or -1 (too long). */
int pa_upd_versions_dir(const char *state_dir, const pa_upd_t *u, char *out, size_t cap);
/* The current link's target ("" when there is no link). 0, or -errno (a `current` that is not a symlink: -EINVAL). */
int pa_upd_link_target(const char *state_dir, const pa_upd_t *u, char *out, size_t cap);
/* Point the link at `version` (symlink to a temporary name, then rename(2)); "" removes the link. 0 or -errno. */
int pa_upd_set_link(const char *state_dir, const pa_upd_t *u, const char *version);

/* The swap of a staged update (u from staged.json): write probation.json (previous = `keep_previous` when a half-done
 * swap is redone, else the link's target — "" for a host link that pa_upd_host_applies() says is superseded, since
 * the installed binary is what ran), for a host update record the identity of `installed_exe` (the binary the
 * supervisor runs when no host update applies; NULL: not recorded) in STATE/host/installed.id, point the link at
 * u->version, remove staged.json, remove a stale `healthy`. Fills u->previous and u->unix_ms. 0, or -1 with err
 * (nothing changed that would keep the worker from starting on its current version). */
int pa_upd_swap(const char *state_dir, pa_upd_t *u, const char *keep_previous, const char *installed_exe, char *err,
                size_t errcap);
/* Commit: append "committed", remove probation.json and healthy, remove version directories other than current and
 * previous (only directories whose names are versions and that were not changed since u->unix_ms: a version staged
 * meanwhile is kept). 0, or -1 with err. */
int pa_upd_commit(const char *state_dir, uint64_t *seq, const pa_upd_t *u, char *err, size_t errcap);
/* Rollback: the link back to u->previous (removed when ""), append "rolled_back" with detail, remove probation.json
 * and healthy. 0, or -1 with err. */
int pa_upd_rollback(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *detail, char *err,
                    size_t errcap);
/* Remove version directories under dir other than keep1/keep2 ("" keeps nothing); never follows symlinks. Entries
 * changed at or after newer_than_ms (0: no such limit) are kept. Returns the number removed, or -errno. */
int pa_upd_prune(const char *dir, const char *keep1, const char *keep2, uint64_t newer_than_ms);

/* The identity of a file as recorded in STATE/host/installed.id: "dev=… ino=… size=… mtime=….…" (stat(2), symlinks
 * followed). 0 or -errno. */
int pa_upd_file_id(const char *path, char *out, size_t cap);
/* Write STATE/host/installed.id (temporary file + rename): the identity of `installed_exe` now. 0 or -errno. */
int pa_upd_write_installed_id(const char *state_dir, const char *installed_exe);
/* Does the host update in STATE/host/current still apply? An OS package upgrade replaces the installed binary; a host
 * update swapped in before it must not shadow it. 1: STATE/host/installed.id names `installed_exe` as it is now, or
 * there is no installed.id (state from before the file existed). 0: superseded (the installed binary changed since
 * the swap, or installed.id or the binary cannot be read: the installed binary is the safe choice). */
int pa_upd_host_applies(const char *state_dir, const char *installed_exe);

/* The pid in STATE/updates/healthy; 0 when absent or not a pid. */
long pa_upd_read_healthy(const char *state_dir);

/* Append one record to STATE/updates/updates.jsonl: {"seq" (++*seq), "time", "unix_ms", "kind", "name", "version",
 * "previous", "state", "detail", "rollout"}. 0 or -errno. */
int pa_upd_record(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *state, const char *detail);
/* The highest seq in updates.jsonl (0 when none). */
uint64_t pa_upd_last_seq(const char *state_dir);

/* Before a worker starts: look at STATE/updates and do what is due (see the top of this file). A bad staged.json is
 * logged, recorded as "failed" with the reason and removed; the worker then starts on its current version. When the
 * outcome is SWAPPED or CONTINUED, *u holds the update in probation. `installed_exe` goes to pa_upd_swap. Everything
 * is logged (supervisor.update.*). */
pa_upd_outcome_t pa_upd_prepare(const char *state_dir, const char *installed_exe, uint64_t *seq, pa_upd_t *u);

#endif
