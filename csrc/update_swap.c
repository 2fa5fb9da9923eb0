/* Staged updates: the supervisor's file operations (see update_swap.h and docs/updates.md §3). */
#include "update_swap.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"
#include "supervisor.h" /* pa_sup_append_bounded, pa_sup_last_seq */

/* ---------------------------------------------------------------------------------------------------------------- */
/* Names and paths                                                                                                  */

int pa_upd_valid_bundle_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > PA_UPD_NAME_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    int alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return 0;
  }
  return 1;
}

int pa_upd_valid_version(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > PA_UPD_VERSION_MAX || s[0] == '.' || strstr(s, "..") || strcmp(s, PA_UPD_LINK) == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c >= 0x7f || c == '/' || c == '\\') return 0;
  }
  return 1;
}

static int path_join(char *out, size_t cap, const char *a, const char *b) {
  int n = snprintf(out, cap, "%s/%s", a, b);
  return n > 0 && (size_t)n < cap ? 0 : -1;
}

static int updates_path(char *out, size_t cap, const char *state_dir, const char *file) {
  int n = snprintf(out, cap, "%s/" PA_UPD_DIR "/%s", state_dir, file);
  return n > 0 && (size_t)n < cap ? 0 : -1;
}

int pa_upd_versions_dir(const char *state_dir, const pa_upd_t *u, char *out, size_t cap) {
  int n = strcmp(u->kind, "host") == 0 ? snprintf(out, cap, "%s/host", state_dir)
                                        : snprintf(out, cap, "%s/bundles/%s", state_dir, u->name);
  return n > 0 && (size_t)n < cap ? 0 : -1;
}

static void fsync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)fsync(fd);
  close(fd);
}

static void parent_of(const char *path, char *out, size_t cap) {
  snprintf(out, cap, "%s", path);
  char *slash = strrchr(out, '/');
  if (slash && slash != out) *slash = '\0';
}

/* unlink(2) that accepts a missing file, then makes the removal durable. 0 or -errno. */
static int remove_file(const char *path) {
  if (unlink(path) != 0 && errno != ENOENT) return -errno;
  char dir[PATH_MAX];
  parent_of(path, dir, sizeof dir);
  fsync_dir(dir);
  return 0;
}

/* Temporary file in the same directory, fsync, rename over path, fsync the directory. 0 or -errno. */
static int write_atomic(const char *path, const char *text) {
  char tmp[PATH_MAX], dir[PATH_MAX];
  if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return -ENAMETOOLONG;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return -errno;
  int rc = 0;
  if (pa_sup_write_all(fd, text, strlen(text)) != 0 || fsync(fd) != 0) rc = errno ? -errno : -EIO;
  if (close(fd) != 0 && rc == 0) rc = -errno;
  if (rc == 0 && rename(tmp, path) != 0) rc = -errno;
  if (rc != 0) {
    unlink(tmp);
    return rc;
  }
  parent_of(path, dir, sizeof dir);
  fsync_dir(dir);
  return 0;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* staged.json, probation.json                                                                                      */

/* 1 loaded, 0 absent, -1 error (err). */
static int load_json(const char *path, json_t **out, char *err, size_t cap) {
  *out = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return 0;
    snprintf(err, cap, "cannot open %s: %s", path, strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, cap, "%s is not a regular file", path);
    close(fd);
    return -1;
  }
  if (st.st_size > PA_UPD_JSON_MAX) {
    snprintf(err, cap, "%s is too large (%lld bytes, at most %d)", path, (long long)st.st_size, PA_UPD_JSON_MAX);
    close(fd);
    return -1;
  }
  char buf[PA_UPD_JSON_MAX + 2]; /* one byte more than allowed: a file that grew since fstat is caught */
  size_t n = 0;
  for (;;) {
    ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      snprintf(err, cap, "cannot read %s: %s", path, strerror(errno));
      close(fd);
      return -1;
    }
    if (r == 0 || (n += (size_t)r) == sizeof buf - 1) break;
  }
  close(fd);
  if (n > PA_UPD_JSON_MAX) {
    snprintf(err, cap, "%s is too large (at most %d bytes)", path, PA_UPD_JSON_MAX);
    return -1;
  }
  json_error_t jerr;
  json_t *doc = json_loadb(buf, n, JSON_REJECT_DUPLICATES, &jerr);
  if (!doc) {
    snprintf(err, cap, "%s: invalid JSON at line %d column %d: %s", path, jerr.line, jerr.column, jerr.text);
    return -1;
  }
  if (!json_is_object(doc)) {
    snprintf(err, cap, "%s: not a JSON object", path);
    json_decref(doc);
    return -1;
  }
  *out = doc;
  return 1;
}

/* Copy a string member (bounded); 0, or -1 with err. An absent or null member is "" when optional. */
static int get_str(json_t *doc, const char *file, const char *key, char *out, size_t cap, int optional, char *err,
                   size_t errcap) {
  json_t *v = json_object_get(doc, key);
  out[0] = '\0';
  if ((!v || json_is_null(v)) && optional) return 0;
  if (!json_is_string(v)) {
    snprintf(err, errcap, "%s: key '%s' must be a string", file, key);
    return -1;
  }
  if (json_string_length(v) >= cap || strlen(json_string_value(v)) != json_string_length(v)) {
    snprintf(err, errcap, "%s: key '%s' is too long (at most %zu bytes) or holds a NUL", file, key, cap - 1);
    return -1;
  }
  memcpy(out, json_string_value(v), json_string_length(v) + 1);
  return 0;
}

/* The members both files share: kind, name, version, rollout. */
static int parse_common(json_t *doc, const char *file, pa_upd_t *u, char *err, size_t cap) {
  /* The rollout first: a "failed" record of a bad file still names the rollout it belongs to. */
  json_t *r = json_object_get(doc, "rollout");
  u->has_rollout = r && !json_is_null(r);
  if (get_str(doc, file, "rollout", u->rollout, sizeof u->rollout, 1, err, cap) != 0) {
    u->has_rollout = 0;
    return -1;
  }
  if (get_str(doc, file, "kind", u->kind, sizeof u->kind, 0, err, cap) != 0 ||
      (strcmp(u->kind, "bundle") != 0 && strcmp(u->kind, "host") != 0)) {
    snprintf(err, cap, "%s: key 'kind' must be \"bundle\" or \"host\"", file);
    u->kind[0] = '\0';
    return -1;
  }
  if (get_str(doc, file, "name", u->name, sizeof u->name, 0, err, cap) != 0) return -1;
  if (strcmp(u->kind, "host") == 0 ? strcmp(u->name, PA_UPD_HOST_NAME) != 0 : !pa_upd_valid_bundle_name(u->name)) {
    char q[2 * PA_UPD_NAME_MAX + 8];
    snprintf(err, cap, "%s: 'name' %s is not a valid %s", file, pa_log_quote(q, sizeof q, u->name),
             strcmp(u->kind, "host") == 0 ? "host name (must be \"pyagent-host\")"
                                          : "bundle name (letters, digits, '_', not starting with a digit)");
    u->name[0] = '\0';
    return -1;
  }
  if (get_str(doc, file, "version", u->version, sizeof u->version, 0, err, cap) != 0) return -1;
  if (!pa_upd_valid_version(u->version)) {
    char q[2 * PA_UPD_VERSION_MAX + 8];
    snprintf(err, cap, "%s: 'version' %s is not a valid version (1 to %d printable characters, no '/', no '..', "
             "not starting with '.')", file, pa_log_quote(q, sizeof q, u->version), PA_UPD_VERSION_MAX);
    u->version[0] = '\0';
    return -1;
  }
  return 0;
}

/* Load STATE/updates/<file> and its common keys into u: 1 (*doc is the document, for the caller to release), 0 when
 * there is no such file, -1 with err set (u keeps what could be read, e.g. the rollout for the failure record). */
static int load_update(const char *state_dir, const char *file, pa_upd_t *u, json_t **doc, char *err, size_t cap) {
  memset(u, 0, sizeof *u);
  char path[PATH_MAX];
  if (updates_path(path, sizeof path, state_dir, file) != 0) {
    snprintf(err, cap, "state directory path too long");
    return -1;
  }
  int rc = load_json(path, doc, err, cap);
  if (rc <= 0) return rc;
  if (parse_common(*doc, file, u, err, cap) != 0) {
    json_decref(*doc);
    return -1;
  }
  return 1;
}

int pa_upd_read_staged(const char *state_dir, pa_upd_t *u, char *err, size_t cap) {
  json_t *doc;
  int rc = load_update(state_dir, PA_UPD_STAGED, u, &doc, err, cap);
  if (rc <= 0) return rc;
  rc = -1;
  json_t *d = json_object_get(doc, "dir");
  if (d && !json_is_string(d)) {
    snprintf(err, cap, PA_UPD_STAGED ": key 'dir' must be a string");
    goto done;
  }
  /* The staged version must be there, a real directory (not a link out of the tree), with its contents. */
  char vdir[PATH_MAX], vpath[PATH_MAX], need[PATH_MAX];
  struct stat st;
  if (pa_upd_versions_dir(state_dir, u, vdir, sizeof vdir) != 0 || path_join(vpath, sizeof vpath, vdir, u->version) ||
      path_join(need, sizeof need, vpath, strcmp(u->kind, "host") == 0 ? PA_UPD_HOST_NAME : "bundle.toml")) {
    snprintf(err, cap, "staged path too long");
    goto done;
  }
  if (lstat(vpath, &st) != 0 || !S_ISDIR(st.st_mode)) {
    snprintf(err, cap, "the staged version directory %s is missing or not a directory", vpath);
    goto done;
  }
  if (lstat(need, &st) != 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, cap, "the staged version has no %s (%s)", strrchr(need, '/') + 1, need);
    goto done;
  }
  if (strcmp(u->kind, "host") == 0 && access(need, X_OK) != 0) {
    snprintf(err, cap, "the staged host %s is not executable", need);
    goto done;
  }
  rc = 1;
done:
  json_decref(doc);
  return rc;
}

int pa_upd_read_probation(const char *state_dir, pa_upd_t *u, char *err, size_t cap) {
  json_t *doc;
  int rc = load_update(state_dir, PA_UPD_PROBATION, u, &doc, err, cap);
  if (rc <= 0) return rc;
  rc = -1;
  if (get_str(doc, PA_UPD_PROBATION, "previous", u->previous, sizeof u->previous, 0, err, cap) != 0)
    goto done;
  if (u->previous[0] && !pa_upd_valid_version(u->previous)) {
    snprintf(err, cap, PA_UPD_PROBATION ": 'previous' is not a valid version");
    goto done;
  }
  json_t *ms = json_object_get(doc, "unix_ms");
  if (!json_is_integer(ms) || json_integer_value(ms) < 0) {
    snprintf(err, cap, PA_UPD_PROBATION ": key 'unix_ms' must be a non-negative integer");
    goto done;
  }
  u->unix_ms = (uint64_t)json_integer_value(ms);
  rc = 1;
done:
  json_decref(doc);
  return rc;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* The link                                                                                                         */

int pa_upd_link_target(const char *state_dir, const pa_upd_t *u, char *out, size_t cap) {
  char dir[PATH_MAX], link[PATH_MAX];
  out[0] = '\0';
  if (pa_upd_versions_dir(state_dir, u, dir, sizeof dir) != 0 || path_join(link, sizeof link, dir, PA_UPD_LINK))
    return -ENAMETOOLONG;
  if (cap < 2) return -ENAMETOOLONG;
  ssize_t n = readlink(link, out, cap - 1);
  if (n < 0) {
    int e = errno;
    return e == ENOENT ? 0 : -e; /* EINVAL: `current` is not a symlink */
  }
  if ((size_t)n >= cap - 1) {
    out[0] = '\0';
    return -ENAMETOOLONG;
  }
  out[n] = '\0';
  return 0;
}

int pa_upd_set_link(const char *state_dir, const pa_upd_t *u, const char *version) {
  char dir[PATH_MAX], link[PATH_MAX], tmp[PATH_MAX];
  if (pa_upd_versions_dir(state_dir, u, dir, sizeof dir) != 0 || path_join(link, sizeof link, dir, PA_UPD_LINK) ||
      path_join(tmp, sizeof tmp, dir, "." PA_UPD_LINK ".tmp"))
    return -ENAMETOOLONG;
  if (!version[0]) {
    struct stat st;
    if (lstat(link, &st) == 0 && !S_ISLNK(st.st_mode)) return -EINVAL; /* never remove a real directory */
    return remove_file(link);
  }
  if (!pa_upd_valid_version(version)) return -EINVAL;
  if (unlink(tmp) != 0 && errno != ENOENT) return -errno;
  if (symlink(version, tmp) != 0) return -errno;
  if (rename(tmp, link) != 0) {
    int e = errno;
    unlink(tmp);
    return -e;
  }
  fsync_dir(dir);
  return 0;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* STATE/host/installed.id                                                                                          */

int pa_upd_file_id(const char *path, char *out, size_t cap) {
  struct stat st;
  if (stat(path, &st) != 0) return -errno;
  int n = snprintf(out, cap, "dev=%ju ino=%ju size=%jd mtime=%jd.%09ld\n", (uintmax_t)st.st_dev,
                   (uintmax_t)st.st_ino, (intmax_t)st.st_size, (intmax_t)st.st_mtim.tv_sec, (long)st.st_mtim.tv_nsec);
  return n > 0 && (size_t)n < cap ? 0 : -ENAMETOOLONG;
}

static int installed_id_path(char *out, size_t cap, const char *state_dir) {
  int n = snprintf(out, cap, "%s/host/" PA_UPD_INSTALLED_ID, state_dir);
  return n > 0 && (size_t)n < cap ? 0 : -1;
}

int pa_upd_write_installed_id(const char *state_dir, const char *installed_exe) {
  char path[PATH_MAX], id[256];
  if (installed_id_path(path, sizeof path, state_dir) != 0) return -ENAMETOOLONG;
  int rc = pa_upd_file_id(installed_exe, id, sizeof id);
  return rc != 0 ? rc : write_atomic(path, id);
}

int pa_upd_host_applies(const char *state_dir, const char *installed_exe) {
  char path[PATH_MAX], now[256], recorded[256];
  if (installed_id_path(path, sizeof path, state_dir) != 0) return 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return errno == ENOENT; /* no installed.id: a host update swapped in before the file existed */
  ssize_t n = read(fd, recorded, sizeof recorded - 1);
  close(fd);
  if (n <= 0) return 0;
  recorded[n] = '\0';
  return pa_upd_file_id(installed_exe, now, sizeof now) == 0 && strcmp(now, recorded) == 0;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* updates.jsonl                                                                                                    */

static uint64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int pa_upd_record(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *state, const char *detail) {
  char path[PATH_MAX], dir[PATH_MAX];
  if (updates_path(path, sizeof path, state_dir, PA_UPD_LOG) != 0) return -ENAMETOOLONG;
  parent_of(path, dir, sizeof dir);
  if (mkdir(dir, 0700) != 0 && errno != EEXIST) return -errno;
  uint64_t now = wall_ms();
  time_t t = (time_t)(now / 1000);
  struct tm tm;
  char when[80];
  gmtime_r(&t, &tm);
  snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
           tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(now % 1000));
  json_t *rec = json_object();
  json_object_set_new(rec, "seq", json_integer((json_int_t)(*seq + 1)));
  json_object_set_new(rec, "time", json_string(when));
  json_object_set_new(rec, "unix_ms", json_integer((json_int_t)now));
  /* Strings read from files were checked to be bounded; json_string refuses invalid UTF-8, so fall back to "". */
  json_object_set_new(rec, "kind", json_string(u->kind));
  json_object_set_new(rec, "name", json_string(u->name));
  json_object_set_new(rec, "version", json_string(u->version));
  json_object_set_new(rec, "previous", json_string(u->previous));
  json_object_set_new(rec, "state", json_string(state));
  json_t *d = json_string(detail ? detail : "");
  json_object_set_new(rec, "detail", d ? d : json_string("(detail not valid UTF-8)"));
  json_t *r = u->has_rollout ? json_string(u->rollout) : NULL;
  json_object_set_new(rec, "rollout", r ? r : json_null());
  char *line = json_dumps(rec, JSON_COMPACT);
  json_decref(rec);
  if (!line) return -ENOMEM;
  int rc = pa_sup_append_bounded(path, line, PA_UPD_LOG_MAX_BYTES);
  free(line);
  if (rc == 0) (*seq)++;
  return rc;
}

uint64_t pa_upd_last_seq(const char *state_dir) {
  char path[PATH_MAX];
  if (updates_path(path, sizeof path, state_dir, PA_UPD_LOG) != 0) return 0;
  return pa_sup_last_seq(path);
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Swap, commit, rollback                                                                                           */

int pa_upd_swap(const char *state_dir, pa_upd_t *u, const char *keep_previous, const char *installed_exe, char *err,
                size_t cap) {
  char probation[PATH_MAX], staged[PATH_MAX], healthy[PATH_MAX];
  int host = strcmp(u->kind, "host") == 0;
  if (updates_path(probation, sizeof probation, state_dir, PA_UPD_PROBATION) ||
      updates_path(staged, sizeof staged, state_dir, PA_UPD_STAGED) ||
      updates_path(healthy, sizeof healthy, state_dir, PA_UPD_HEALTHY)) {
    snprintf(err, cap, "state directory path too long");
    return -1;
  }
  if (keep_previous) {
    snprintf(u->previous, sizeof u->previous, "%s", keep_previous);
  } else {
    char target[PATH_MAX];
    int rc = pa_upd_link_target(state_dir, u, target, sizeof target);
    if (rc != 0 || (target[0] && !pa_upd_valid_version(target)) || strlen(target) >= sizeof u->previous) {
      snprintf(err, cap, "the %s link of %s %s is not a link to a version directory (%s)", PA_UPD_LINK, u->kind,
               u->name, rc ? strerror(-rc) : "bad target");
      return -1;
    }
    memcpy(u->previous, target, strlen(target) + 1); /* checked above: it fits */
    /* A host link superseded by an OS package upgrade did not run: the installed binary did, and a rollback goes
     * back to it (the link removed). */
    if (host && installed_exe && target[0] && !pa_upd_host_applies(state_dir, installed_exe)) u->previous[0] = '\0';
  }
  u->unix_ms = wall_ms();
  /* 1. probation.json: from here on a restarted supervisor knows the previous version. */
  json_t *doc = json_object();
  json_object_set_new(doc, "kind", json_string(u->kind));
  json_object_set_new(doc, "name", json_string(u->name));
  json_object_set_new(doc, "version", json_string(u->version));
  json_object_set_new(doc, "previous", json_string(u->previous));
  json_t *r = u->has_rollout ? json_string(u->rollout) : NULL;
  json_object_set_new(doc, "rollout", r ? r : json_null());
  json_object_set_new(doc, "unix_ms", json_integer((json_int_t)u->unix_ms));
  char *text = json_dumps(doc, JSON_COMPACT);
  json_decref(doc);
  int rc = text ? write_atomic(probation, text) : -ENOMEM;
  free(text);
  if (rc != 0) {
    snprintf(err, cap, "cannot write %s: %s", probation, strerror(-rc));
    return -1;
  }
  /* 1b. A host update applies while the installed binary is the one it was swapped in over (pa_upd_host_applies):
   * recorded before the link, so a crash in between leaves no link without its record. */
  if (host && installed_exe) {
    rc = pa_upd_write_installed_id(state_dir, installed_exe);
    if (rc != 0) {
      snprintf(err, cap, "cannot record the installed host %s in %s/host/" PA_UPD_INSTALLED_ID ": %s", installed_exe,
               state_dir, strerror(-rc));
      (void)remove_file(probation);
      return -1;
    }
  }
  /* 2. A stale `healthy` (an earlier probation) must not vouch for the new worker. */
  (void)remove_file(healthy);
  /* 3. The link: one rename(2). */
  rc = pa_upd_set_link(state_dir, u, u->version);
  if (rc != 0) {
    snprintf(err, cap, "cannot point the %s link of %s %s at %s: %s", PA_UPD_LINK, u->kind, u->name, u->version,
             strerror(-rc));
    (void)remove_file(probation);
    return -1;
  }
  /* 4. staged.json last: until it is gone, a restarted supervisor redoes the steps above (with this `previous`). */
  rc = remove_file(staged);
  if (rc != 0) {
    snprintf(err, cap, "cannot remove %s: %s", staged, strerror(-rc));
    return -1;
  }
  return 0;
}

typedef struct {
  int errors;
} pa__prune_t;
static pa__prune_t pa__prune; /* nftw has no user pointer; the supervisor is single-threaded */

static int prune_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)ftw;
  int rc = flag == FTW_DP || flag == FTW_DNR ? rmdir(path) : unlink(path);
  if (rc != 0 && errno != ENOENT) pa__prune.errors++;
  return 0;
}

int pa_upd_prune(const char *dir, const char *keep1, const char *keep2, uint64_t newer_than_ms) {
  DIR *d = opendir(dir);
  if (!d) return errno == ENOENT ? 0 : -errno;
  int removed = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    const char *n = e->d_name;
    if (!pa_upd_valid_version(n) || strcmp(n, keep1) == 0 || strcmp(n, keep2) == 0) continue;
    struct stat st;
    /* Only real directories: `current` and any other link are never followed, files are left alone. */
    if (fstatat(dirfd(d), n, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) continue;
    uint64_t mtime = (uint64_t)st.st_mtim.tv_sec * 1000 + (uint64_t)st.st_mtim.tv_nsec / 1000000;
    uint64_t ctime = (uint64_t)st.st_ctim.tv_sec * 1000 + (uint64_t)st.st_ctim.tv_nsec / 1000000;
    if (newer_than_ms && (mtime >= newer_than_ms || ctime >= newer_than_ms)) continue; /* staged meanwhile */
    char path[PATH_MAX];
    if (path_join(path, sizeof path, dir, n) != 0) continue;
    pa__prune.errors = 0;
    /* Depth first, physical (links are removed, not followed), never across a mount point. */
    if (nftw(path, prune_one, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT) != 0 || pa__prune.errors) {
      char q[PATH_MAX + 8];
      pa_log(PA_LOG_WARNING, "supervisor.update.prune_failed", "dir=%s", pa_log_quote(q, sizeof q, path));
      continue;
    }
    removed++;
  }
  closedir(d);
  return removed;
}

/* The end of a probation: its record (first: a supervisor killed before probation.json is gone ends it again — a
 * duplicate record, never a missing one), then probation.json and healthy removed. 0, or -1 with err set. */
static int end_probation(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *state,
                         const char *detail, char *err, size_t cap) {
  char probation[PATH_MAX], healthy[PATH_MAX];
  if (updates_path(probation, sizeof probation, state_dir, PA_UPD_PROBATION) ||
      updates_path(healthy, sizeof healthy, state_dir, PA_UPD_HEALTHY)) {
    snprintf(err, cap, "state directory path too long");
    return -1;
  }
  int rc = pa_upd_record(state_dir, seq, u, state, detail);
  if (rc != 0) pa_log(PA_LOG_WARNING, "supervisor.update.record_failed", "error=\"%s\"", strerror(-rc));
  rc = remove_file(probation);
  if (rc != 0) {
    snprintf(err, cap, "cannot remove %s: %s", probation, strerror(-rc));
    return -1;
  }
  (void)remove_file(healthy);
  return 0;
}

int pa_upd_commit(const char *state_dir, uint64_t *seq, const pa_upd_t *u, char *err, size_t cap) {
  char dir[PATH_MAX];
  if (pa_upd_versions_dir(state_dir, u, dir, sizeof dir)) {
    snprintf(err, cap, "state directory path too long");
    return -1;
  }
  if (end_probation(state_dir, seq, u, "committed", "", err, cap) != 0) return -1;
  int n = pa_upd_prune(dir, u->version, u->previous, u->unix_ms);
  if (n < 0) {
    char q[PATH_MAX + 8];
    pa_log(PA_LOG_WARNING, "supervisor.update.prune_failed", "dir=%s error=\"%s\"", pa_log_quote(q, sizeof q, dir),
           strerror(-n));
  } else if (n > 0) {
    pa_log(PA_LOG_INFO, "supervisor.update.pruned", "kind=%s name=%s removed=%d", u->kind, u->name, n);
  }
  return 0;
}

int pa_upd_rollback(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *detail, char *err,
                    size_t cap) {
  /* The link first: from here on the worker starts on the previous version whatever else happens. */
  int rc = pa_upd_set_link(state_dir, u, u->previous);
  if (rc != 0) {
    snprintf(err, cap, "cannot point the %s link of %s %s back at '%s': %s", PA_UPD_LINK, u->kind, u->name,
             u->previous, strerror(-rc));
    return -1;
  }
  return end_probation(state_dir, seq, u, "rolled_back", detail, err, cap);
}

long pa_upd_read_healthy(const char *state_dir) {
  char path[PATH_MAX], buf[32];
  if (updates_path(path, sizeof path, state_dir, PA_UPD_HEALTHY) != 0) return 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  char *end;
  errno = 0;
  long pid = strtol(buf, &end, 10);
  while (*end == '\n' || *end == ' ' || *end == '\r') end++;
  if (errno || end == buf || *end || pid <= 0) return 0;
  return pid;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Before a worker start                                                                                            */

static void log_failed(const pa_upd_t *u, const char *why) {
  char q[1024];
  pa_log(PA_LOG_ERROR, "supervisor.update.failed", "kind=%s name=%s version=%s reason=%s", u->kind[0] ? u->kind : "-",
         u->name[0] ? u->name : "-", u->version[0] ? u->version : "-", pa_log_quote(q, sizeof q, why));
}

static void do_rollback(const char *state_dir, uint64_t *seq, const pa_upd_t *u, const char *detail) {
  char err[PATH_MAX + 256], q[512];
  if (pa_upd_rollback(state_dir, seq, u, detail, err, sizeof err) != 0) {
    pa_log(PA_LOG_ERROR, "supervisor.update.rollback_failed", "error=%s", pa_log_quote(q, sizeof q, err));
    return;
  }
  pa_log(PA_LOG_WARNING, "supervisor.update.rolled_back", "kind=%s name=%s version=%s previous=%s detail=%s", u->kind,
         u->name, u->version, u->previous[0] ? u->previous : "-", pa_log_quote(q, sizeof q, detail));
}

pa_upd_outcome_t pa_upd_prepare(const char *state_dir, const char *installed_exe, uint64_t *seq, pa_upd_t *u) {
  char err[PATH_MAX + 512], staged_path[PATH_MAX], probation_path[PATH_MAX];
  if (updates_path(staged_path, sizeof staged_path, state_dir, PA_UPD_STAGED) ||
      updates_path(probation_path, sizeof probation_path, state_dir, PA_UPD_PROBATION))
    return PA_UPD_IDLE;
  pa_upd_t p, st;
  int have_p = pa_upd_read_probation(state_dir, &p, err, sizeof err);
  if (have_p < 0) {
    /* We write probation.json atomically, so this is damage from outside; the link stays where it is. */
    log_failed(&p, err);
    (void)pa_upd_record(state_dir, seq, &p, "failed", err);
    (void)remove_file(probation_path);
    have_p = 0;
  }
  int have_s = pa_upd_read_staged(state_dir, &st, err, sizeof err);
  if (have_s < 0) {
    log_failed(&st, err);
    (void)pa_upd_record(state_dir, seq, &st, "failed", err);
    (void)remove_file(staged_path);
    have_s = 0;
  }
  const char *keep_previous = NULL;
  if (have_p) {
    int same = have_s && strcmp(p.kind, st.kind) == 0 && strcmp(p.name, st.name) == 0 &&
               strcmp(p.version, st.version) == 0;
    char target[PATH_MAX];
    int rc = pa_upd_link_target(state_dir, &p, target, sizeof target);
    if (same) {
      /* Killed in the middle of the swap: redo it with the previous version it had recorded. */
      keep_previous = p.previous;
      pa_log(PA_LOG_INFO, "supervisor.update.swap_redo", "kind=%s name=%s version=%s previous=%s", p.kind, p.name,
             p.version, p.previous[0] ? p.previous : "-");
    } else if (!have_s && rc == 0 && strcmp(target, p.version) == 0) {
      *u = p;
      char healthy[PATH_MAX];
      if (updates_path(healthy, sizeof healthy, state_dir, PA_UPD_HEALTHY) == 0) (void)remove_file(healthy);
      pa_log(PA_LOG_INFO, "supervisor.update.probation_continued", "kind=%s name=%s version=%s previous=%s", p.kind,
             p.name, p.version, p.previous[0] ? p.previous : "-");
      return PA_UPD_CONTINUED;
    } else {
      /* The link is not on the version in probation (a rollback was interrupted), or a newer update was staged
       * while this one was in probation and the supervisor was killed: this probation failed. */
      do_rollback(state_dir, seq, &p,
                  have_s ? "the supervisor stopped during the probation and a newer update was staged"
                         : "the supervisor stopped during the rollback");
    }
  }
  if (!have_s) return PA_UPD_IDLE;
  char q[sizeof err + 64];
  if (pa_upd_swap(state_dir, &st, keep_previous, installed_exe, err, sizeof err) != 0) {
    log_failed(&st, err);
    (void)pa_upd_record(state_dir, seq, &st, "failed", err);
    (void)remove_file(staged_path);
    return PA_UPD_IDLE;
  }
  int rc = pa_upd_record(state_dir, seq, &st, "probation", "");
  if (rc != 0) pa_log(PA_LOG_WARNING, "supervisor.update.record_failed", "error=%s",
                      pa_log_quote(q, sizeof q, strerror(-rc)));
  pa_log(PA_LOG_INFO, "supervisor.update.swap", "kind=%s name=%s version=%s previous=%s", st.kind, st.name,
         st.version, st.previous[0] ? st.previous : "-");
  *u = st;
  return PA_UPD_SWAPPED;
}
