/* Staged updates, the supervisor's file operations (csrc/update_swap.c) on a temporary state directory: swap, commit,
 * rollback, the recovery of every half-done step, bad staged.json files, names, pruning and the bounded log. The
 * supervisor process around them is tested end to end in tests/python/integration/test_update_swap.py. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "supervisor.h"
#include "task.h"
#include "update_swap.h"

typedef struct {
  char root[64];
} tmpstate_t;

static void put(const char *root, const char *rel, const char *text, mode_t mode) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", root, rel);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
  if (fd < 0) ASSERT_FAILED("cannot create %s: %s", path, strerror(errno));
  ASSERT_EQ(write(fd, text, strlen(text)), (ssize_t)strlen(text));
  close(fd);
  chmod(path, mode);
}

static void mk(const char *root, const char *rel) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", root, rel);
  for (char *p = path + strlen(root) + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      char c = *p;
      *p = '\0';
      if (mkdir(path, 0700) != 0 && errno != EEXIST) ASSERT_FAILED("mkdir %s: %s", path, strerror(errno));
      *p = c;
      if (!c) break;
    }
  }
}

static int exists(const char *root, const char *rel) {
  char path[512];
  struct stat st;
  snprintf(path, sizeof path, "%s/%s", root, rel);
  return lstat(path, &st) == 0;
}

static void link_at(const char *root, const char *rel, const char *target) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", root, rel);
  unlink(path);
  ASSERT_OK(symlink(target, path));
}

/* The target of a link ("" when there is none). */
static const char *target_of(const char *root, const char *rel) {
  static char buf[256];
  char path[512];
  snprintf(path, sizeof path, "%s/%s", root, rel);
  ssize_t n = readlink(path, buf, sizeof buf - 1);
  buf[n > 0 ? n : 0] = '\0';
  return buf;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f) {
  (void)st;
  (void)f;
  return flag == FTW_DP ? rmdir(p) : unlink(p);
}

static void tmp_init(tmpstate_t *t) {
  snprintf(t->root, sizeof t->root, "/tmp/pa-upd-test-XXXXXX");
  ASSERT(mkdtemp(t->root) != NULL);
  mk(t->root, "updates");
}

static void tmp_free(tmpstate_t *t) { nftw(t->root, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

/* A bundle version directory. */
static void bundle_version(const char *root, const char *name, const char *version) {
  char rel[256], text[256];
  snprintf(rel, sizeof rel, "bundles/%s/%s", name, version);
  mk(root, rel);
  snprintf(rel, sizeof rel, "bundles/%s/%s/bundle.toml", name, version);
  snprintf(text, sizeof text, "name = \"%s\"\nversion = \"%s\"\n", name, version);
  put(root, rel, text, 0600);
}

static void stage(const char *root, const char *kind, const char *name, const char *version) {
  char text[512];
  snprintf(text, sizeof text,
           "{\"kind\": \"%s\", \"name\": \"%s\", \"version\": \"%s\", \"dir\": \"/x\", \"rollout\": \"r-1\"}", kind,
           name, version);
  put(root, "updates/staged.json", text, 0600);
}

/* The records of updates.jsonl (a JSON array; the caller decrefs). */
static json_t *records(const char *root) {
  char path[512], line[4096];
  snprintf(path, sizeof path, "%s/updates/updates.jsonl", root);
  json_t *all = json_array();
  FILE *f = fopen(path, "r");
  if (!f) return all;
  while (fgets(line, sizeof line, f)) {
    json_t *rec = json_loads(line, 0, NULL);
    ASSERT(rec != NULL);
    json_array_append_new(all, rec);
  }
  fclose(f);
  return all;
}

static const char *rec_str(json_t *recs, size_t i, const char *key) {
  return json_string_value(json_object_get(json_array_get(recs, i), key));
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

TEST_IMPL(update_swap_commit_prunes) {
  tmpstate_t t;
  tmp_init(&t);
  bundle_version(t.root, "hello", "0.9");
  bundle_version(t.root, "hello", "1.0");
  bundle_version(t.root, "hello", "2.0");
  /* Things pruning must leave alone: a link named like a version pointing out of the tree, a file, a hidden
   * temporary directory, and (inside the pruned 0.9) a link to a file outside. */
  mk(t.root, "outside");
  put(t.root, "outside/keep.txt", "keep", 0600);
  link_at(t.root, "bundles/hello/3.0", "../../outside");
  link_at(t.root, "bundles/hello/0.9/escape", "../../../outside/keep.txt");
  put(t.root, "bundles/hello/4.0", "a file", 0600);
  mk(t.root, "bundles/hello/.2.1.tmp");
  link_at(t.root, "bundles/hello/current", "1.0");
  stage(t.root, "bundle", "hello", "2.0");
  sleep_ms(20); /* everything above is older than the swap */

  uint64_t seq = 0;
  pa_upd_t u;
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "2.0") == 0);
  ASSERT(strcmp(u.previous, "1.0") == 0 && strcmp(u.version, "2.0") == 0 && strcmp(u.rollout, "r-1") == 0);
  ASSERT(!exists(t.root, "updates/staged.json"));
  ASSERT(!exists(t.root, "bundles/hello/.current.tmp"));
  pa_upd_t p;
  char err[512];
  ASSERT_EQ(pa_upd_read_probation(t.root, &p, err, sizeof err), 1);
  ASSERT(strcmp(p.previous, "1.0") == 0 && strcmp(p.name, "hello") == 0 && p.unix_ms == u.unix_ms);
  ASSERT(p.has_rollout && strcmp(p.rollout, "r-1") == 0);

  /* A version staged during the probation (after the swap) must survive the commit's pruning. */
  sleep_ms(5);
  bundle_version(t.root, "hello", "2.5");

  ASSERT_EQ(pa_upd_read_healthy(t.root), 0);
  put(t.root, "updates/healthy", "4242\n", 0600);
  ASSERT_EQ(pa_upd_read_healthy(t.root), 4242);
  ASSERT_OK(pa_upd_commit(t.root, &seq, &u, err, sizeof err));
  ASSERT(!exists(t.root, "updates/probation.json") && !exists(t.root, "updates/healthy"));
  ASSERT(!exists(t.root, "bundles/hello/0.9"));
  ASSERT(exists(t.root, "bundles/hello/1.0/bundle.toml") && exists(t.root, "bundles/hello/2.0/bundle.toml"));
  ASSERT(exists(t.root, "bundles/hello/2.5/bundle.toml"));
  ASSERT(exists(t.root, "bundles/hello/3.0") && exists(t.root, "outside/keep.txt"));
  ASSERT(exists(t.root, "bundles/hello/4.0") && exists(t.root, "bundles/hello/.2.1.tmp"));
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "2.0") == 0);

  json_t *recs = records(t.root);
  ASSERT_EQ(json_array_size(recs), 2);
  ASSERT(strcmp(rec_str(recs, 0, "state"), "probation") == 0 && strcmp(rec_str(recs, 1, "state"), "committed") == 0);
  ASSERT_EQ(json_integer_value(json_object_get(json_array_get(recs, 0), "seq")), 1);
  ASSERT_EQ(json_integer_value(json_object_get(json_array_get(recs, 1), "seq")), 2);
  json_t *r1 = json_array_get(recs, 1);
  ASSERT(strcmp(rec_str(recs, 1, "kind"), "bundle") == 0 && strcmp(rec_str(recs, 1, "name"), "hello") == 0);
  ASSERT(strcmp(rec_str(recs, 1, "version"), "2.0") == 0 && strcmp(rec_str(recs, 1, "previous"), "1.0") == 0);
  ASSERT(strcmp(rec_str(recs, 1, "rollout"), "r-1") == 0 && strcmp(rec_str(recs, 1, "detail"), "") == 0);
  ASSERT(json_is_integer(json_object_get(r1, "unix_ms")) && strlen(rec_str(recs, 1, "time")) == 24);
  json_decref(recs);
  /* Nothing left to do: the next start is an ordinary one. */
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_IDLE);
  ASSERT_UINT64_EQ(pa_upd_last_seq(t.root), 2);
  tmp_free(&t);
  return 0;
}

TEST_IMPL(update_swap_rollback) {
  tmpstate_t t;
  tmp_init(&t);
  bundle_version(t.root, "hello", "1.0");
  bundle_version(t.root, "hello", "2.0");
  link_at(t.root, "bundles/hello/current", "1.0");
  stage(t.root, "bundle", "hello", "2.0");
  uint64_t seq = 7; /* continues from an earlier supervisor */
  pa_upd_t u;
  char err[512];
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  put(t.root, "updates/healthy", "1\n", 0600);
  ASSERT_OK(pa_upd_rollback(t.root, &seq, &u, "exit code 2", err, sizeof err));
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "1.0") == 0);
  ASSERT(!exists(t.root, "updates/probation.json") && !exists(t.root, "updates/healthy"));
  ASSERT(exists(t.root, "bundles/hello/2.0")); /* a rollback prunes nothing */
  json_t *recs = records(t.root);
  ASSERT_EQ(json_array_size(recs), 2);
  ASSERT(strcmp(rec_str(recs, 1, "state"), "rolled_back") == 0);
  ASSERT(strcmp(rec_str(recs, 1, "detail"), "exit code 2") == 0);
  ASSERT_EQ(json_integer_value(json_object_get(json_array_get(recs, 1), "seq")), 9);
  json_decref(recs);

  /* A first install (no link before): the rollback removes the link. The host, this time. */
  mk(t.root, "host/9.9.9");
  put(t.root, "host/9.9.9/pyagent-host", "#!/bin/sh\nexit 1\n", 0755);
  stage(t.root, "host", "pyagent-host", "9.9.9");
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  ASSERT(strcmp(target_of(t.root, "host/current"), "9.9.9") == 0 && strcmp(u.previous, "") == 0);
  char exe[600];
  snprintf(exe, sizeof exe, "%s/host/current/pyagent-host", t.root);
  ASSERT_OK(access(exe, X_OK));
  ASSERT_OK(pa_upd_rollback(t.root, &seq, &u, "signal 11", err, sizeof err));
  ASSERT(!exists(t.root, "host/current") && exists(t.root, "host/9.9.9/pyagent-host"));
  recs = records(t.root);
  ASSERT(strcmp(rec_str(recs, 3, "state"), "rolled_back") == 0 && strcmp(rec_str(recs, 3, "previous"), "") == 0);
  ASSERT(strcmp(rec_str(recs, 3, "name"), "pyagent-host") == 0 && strcmp(rec_str(recs, 3, "kind"), "host") == 0);
  json_decref(recs);
  tmp_free(&t);
  return 0;
}

TEST_IMPL(update_swap_recovery) {
  tmpstate_t t;
  tmp_init(&t);
  bundle_version(t.root, "hello", "1.0");
  bundle_version(t.root, "hello", "2.0");
  static const char probation[] = "{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"2.0\", \"previous\": "
                                  "\"1.0\", \"rollout\": null, \"unix_ms\": 1}";
  uint64_t seq = 0;
  pa_upd_t u;
  /* Killed after probation.json, before the link: redone, with the recorded previous. */
  link_at(t.root, "bundles/hello/current", "1.0");
  stage(t.root, "bundle", "hello", "2.0");
  put(t.root, "updates/probation.json", probation, 0600);
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "2.0") == 0 && strcmp(u.previous, "1.0") == 0);
  ASSERT(!exists(t.root, "updates/staged.json") && exists(t.root, "updates/probation.json"));
  /* Killed after the link, before staged.json was removed: redone; previous is still 1.0, not the link's 2.0. */
  stage(t.root, "bundle", "hello", "2.0");
  put(t.root, "updates/probation.json", probation, 0600);
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "2.0") == 0 && strcmp(u.previous, "1.0") == 0);
  pa_upd_t p;
  char err[512];
  ASSERT_EQ(pa_upd_read_probation(t.root, &p, err, sizeof err), 1);
  ASSERT(strcmp(p.previous, "1.0") == 0);
  /* Killed during the probation: it continues (a stale healthy does not vouch for the next worker). */
  put(t.root, "updates/healthy", "99\n", 0600);
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_CONTINUED);
  ASSERT(strcmp(u.version, "2.0") == 0 && strcmp(u.previous, "1.0") == 0);
  ASSERT(!exists(t.root, "updates/healthy"));
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_CONTINUED); /* idempotent */
  /* Killed during a rollback (link back, probation.json still there): the rollback is finished. */
  link_at(t.root, "bundles/hello/current", "1.0");
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_IDLE);
  ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "1.0") == 0);
  ASSERT(!exists(t.root, "updates/probation.json"));
  json_t *recs = records(t.root);
  size_t n = json_array_size(recs);
  ASSERT_EQ(n, 3); /* probation, probation (redone), rolled_back */
  ASSERT(strcmp(rec_str(recs, n - 1, "state"), "rolled_back") == 0);
  ASSERT(strstr(rec_str(recs, n - 1, "detail"), "during the rollback") != NULL);
  json_decref(recs);
  tmp_free(&t);
  return 0;
}

TEST_IMPL(update_swap_bad_staged) {
  static const struct {
    const char *json;
    const char *expect;
  } cases[] = {
      {"not json", "invalid JSON"},
      {"[]", "not a JSON object"},
      {"{\"kind\": \"bundle\", \"kind\": \"host\"}", "duplicate"},
      {"{\"kind\": \"driver\", \"name\": \"hello\", \"version\": \"2.0\"}", "'kind'"},
      {"{\"kind\": \"bundle\", \"name\": \"../etc\", \"version\": \"2.0\"}", "not a valid bundle name"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"..\"}", "not a valid version"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"../1.0\"}", "not a valid version"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \".hidden\"}", "not a valid version"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"a/b\"}", "not a valid version"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"current\"}", "not a valid version"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": 2}", "'version' must be a string"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"2.0\", \"rollout\": 5}", "'rollout'"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"3.0\"}", "missing or not a directory"},
      {"{\"kind\": \"bundle\", \"name\": \"hello\", \"version\": \"9.9\"}", "no bundle.toml"},
      {"{\"kind\": \"host\", \"name\": \"hello\", \"version\": \"1.0\"}", "must be \"pyagent-host\""},
      {"{\"kind\": \"host\", \"name\": \"pyagent-host\", \"version\": \"1.0\"}", "not executable"},
  };
  tmpstate_t t;
  tmp_init(&t);
  bundle_version(t.root, "hello", "1.0");
  bundle_version(t.root, "hello", "2.0");
  mk(t.root, "bundles/hello/9.9");
  mk(t.root, "host/1.0");
  put(t.root, "host/1.0/pyagent-host", "#!/bin/sh\n", 0644);
  link_at(t.root, "bundles/hello/current", "1.0");
  uint64_t seq = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    put(t.root, "updates/staged.json", cases[i].json, 0600);
    pa_upd_t u;
    ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_IDLE);
    ASSERT(!exists(t.root, "updates/staged.json") && !exists(t.root, "updates/probation.json"));
    ASSERT(strcmp(target_of(t.root, "bundles/hello/current"), "1.0") == 0);
    ASSERT(!exists(t.root, "host/current"));
    json_t *recs = records(t.root);
    ASSERT_EQ(json_array_size(recs), i + 1);
    ASSERT(strcmp(rec_str(recs, i, "state"), "failed") == 0);
    const char *detail = rec_str(recs, i, "detail");
    if (!strstr(detail, cases[i].expect)) ASSERT_FAILED("case %zu: '%s' does not mention '%s'", i, detail,
                                                        cases[i].expect);
    json_decref(recs);
  }
  /* Too large. */
  char big[PA_UPD_JSON_MAX + 100];
  memset(big, ' ', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  big[0] = '{';
  big[sizeof big - 2] = '}';
  put(t.root, "updates/staged.json", big, 0600);
  pa_upd_t u;
  char err[512];
  ASSERT_EQ(pa_upd_read_staged(t.root, &u, err, sizeof err), -1);
  ASSERT(strstr(err, "too large") != NULL);
  /* A `current` that is a real directory is never replaced or removed. */
  char path[512];
  snprintf(path, sizeof path, "%s/bundles/hello/current", t.root);
  unlink(path);
  mk(t.root, "bundles/hello/current");
  stage(t.root, "bundle", "hello", "2.0");
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_IDLE);
  ASSERT(exists(t.root, "bundles/hello/current") && !exists(t.root, "updates/probation.json"));
  pa_upd_t v = {.kind = "bundle", .name = "hello"};
  ASSERT_EQ(pa_upd_set_link(t.root, &v, ""), -EINVAL);
  tmp_free(&t);
  return 0;
}

TEST_IMPL(update_swap_names) {
  ASSERT(pa_upd_valid_bundle_name("hello"));
  ASSERT(pa_upd_valid_bundle_name("_x9"));
  ASSERT(!pa_upd_valid_bundle_name(""));
  ASSERT(!pa_upd_valid_bundle_name("9x"));
  ASSERT(!pa_upd_valid_bundle_name("a-b"));
  ASSERT(!pa_upd_valid_bundle_name("a/b"));
  ASSERT(!pa_upd_valid_bundle_name(".."));
  char longname[PA_UPD_NAME_MAX + 2];
  memset(longname, 'a', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  ASSERT(!pa_upd_valid_bundle_name(longname));
  longname[PA_UPD_NAME_MAX] = '\0';
  ASSERT(pa_upd_valid_bundle_name(longname));

  ASSERT(pa_upd_valid_version("1.2.3"));
  ASSERT(pa_upd_valid_version("2.0.0-rc.1+build5"));
  ASSERT(pa_upd_valid_version("v1"));
  ASSERT(!pa_upd_valid_version(""));
  ASSERT(!pa_upd_valid_version("."));
  ASSERT(!pa_upd_valid_version(".."));
  ASSERT(!pa_upd_valid_version("1..2"));
  ASSERT(!pa_upd_valid_version(".1"));
  ASSERT(!pa_upd_valid_version("1/2"));
  ASSERT(!pa_upd_valid_version("1\\2"));
  ASSERT(!pa_upd_valid_version("1 2"));
  ASSERT(!pa_upd_valid_version("1\n"));
  ASSERT(!pa_upd_valid_version("caf\xc3\xa9"));
  ASSERT(!pa_upd_valid_version("current"));
  char longv[PA_UPD_VERSION_MAX + 2];
  memset(longv, '1', sizeof longv - 1);
  longv[sizeof longv - 1] = '\0';
  ASSERT(!pa_upd_valid_version(longv));
  return 0;
}

TEST_IMPL(update_swap_log_bounded) {
  tmpstate_t t;
  tmp_init(&t);
  pa_upd_t u = {.kind = "bundle", .name = "hello", .version = "2.0", .previous = "1.0", .has_rollout = 0};
  uint64_t seq = 0;
  char detail[300];
  memset(detail, 'd', sizeof detail - 1);
  detail[sizeof detail - 1] = '\0';
  char path[512];
  snprintf(path, sizeof path, "%s/updates/updates.jsonl", t.root);
  for (int i = 0; i < 600; i++) {
    ASSERT_OK(pa_upd_record(t.root, &seq, &u, i % 2 ? "committed" : "probation", detail));
    struct stat st;
    ASSERT_OK(stat(path, &st));
    ASSERT_LE(st.st_size, PA_UPD_LOG_MAX_BYTES);
  }
  ASSERT_UINT64_EQ(seq, 600);
  ASSERT_UINT64_EQ(pa_upd_last_seq(t.root), 600);
  json_t *recs = records(t.root);
  size_t n = json_array_size(recs);
  ASSERT_GE(n, 50);
  for (size_t i = 0; i < n; i++) {
    ASSERT_EQ(json_integer_value(json_object_get(json_array_get(recs, i), "seq")), (json_int_t)(600 - n + 1 + i));
    ASSERT(json_is_null(json_object_get(json_array_get(recs, i), "rollout")));
  }
  json_decref(recs);
  /* A new supervisor continues the numbering. */
  uint64_t next = pa_upd_last_seq(t.root);
  ASSERT_OK(pa_upd_record(t.root, &next, &u, "probation", ""));
  ASSERT_UINT64_EQ(next, 601);
  tmp_free(&t);
  return 0;
}

/* A link that cannot be rewritten (here: `.current.tmp` is a non-empty directory, which unlink(2) refuses even to
 * root; in the field a read-only file system, EPERM, no inodes): the rollback fails and changes nothing — the link
 * stays on the new version, probation.json stays, no record — so the next start continues the probation (the
 * supervisor then restarts with backoff, test_update_swap.py). Once the link can be written, the rollback works. */
TEST_IMPL(update_swap_rollback_fails) {
  tmpstate_t t;
  tmp_init(&t);
  bundle_version(t.root, "hello", "1.0");
  bundle_version(t.root, "hello", "2.0");
  link_at(t.root, "bundles/hello/current", "1.0");
  stage(t.root, "bundle", "hello", "2.0");
  uint64_t seq = 0;
  pa_upd_t u;
  char err[1024];
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_SWAPPED);
  mk(t.root, "bundles/hello/.current.tmp/blocker");
  ASSERT_EQ(pa_upd_rollback(t.root, &seq, &u, "exit code 1", err, sizeof err), -1);
  ASSERT_STR_CONTAINS(err, "back at '1.0'");
  ASSERT_STR_EQ(target_of(t.root, "bundles/hello/current"), "2.0");
  ASSERT(exists(t.root, "updates/probation.json"));
  json_t *recs = records(t.root);
  ASSERT_EQ(json_array_size(recs), 1); /* probation only */
  json_decref(recs);
  ASSERT_EQ(pa_upd_prepare(t.root, NULL, &seq, &u), PA_UPD_CONTINUED);
  ASSERT_STR_EQ(u.version, "2.0");
  ASSERT_STR_EQ(u.previous, "1.0");
  char blocker[600];
  snprintf(blocker, sizeof blocker, "%s/bundles/hello/.current.tmp/blocker", t.root);
  ASSERT_OK(rmdir(blocker));
  *strrchr(blocker, '/') = '\0';
  ASSERT_OK(rmdir(blocker));
  ASSERT_OK(pa_upd_rollback(t.root, &seq, &u, "exit code 1", err, sizeof err));
  ASSERT_STR_EQ(target_of(t.root, "bundles/hello/current"), "1.0");
  ASSERT(!exists(t.root, "updates/probation.json"));
  recs = records(t.root);
  ASSERT_EQ(json_array_size(recs), 2);
  ASSERT_STR_EQ(rec_str(recs, 1, "state"), "rolled_back");
  json_decref(recs);
  tmp_free(&t);
  return 0;
}

/* Replace a file the way a package manager does: a new file renamed over it (a new inode). */
static void replace_file(const char *root, const char *rel, const char *text) {
  char tmp[256], path[512], from[512];
  snprintf(tmp, sizeof tmp, "%s.new", rel);
  put(root, tmp, text, 0755);
  snprintf(from, sizeof from, "%s/%s", root, tmp);
  snprintf(path, sizeof path, "%s/%s", root, rel);
  ASSERT_OK(rename(from, path));
}

/* STATE/host/installed.id: a host update applies only while the installed binary is the one it was swapped in over;
 * an OS package upgrade of the installed binary supersedes it, and the next host update's swap takes the installed
 * binary (not the superseded link) as the version to roll back to. */
TEST_IMPL(update_swap_host_installed_id) {
  tmpstate_t t;
  tmp_init(&t);
  mk(t.root, "inst");
  put(t.root, "inst/pyagent-host", "#!/bin/sh\necho installed 1\n", 0755);
  char installed[600];
  snprintf(installed, sizeof installed, "%s/inst/pyagent-host", t.root);
  mk(t.root, "host/9.9.9");
  put(t.root, "host/9.9.9/pyagent-host", "#!/bin/sh\nexit 0\n", 0755);
  /* State from before installed.id existed: a host link alone applies. */
  link_at(t.root, "host/current", "9.9.9");
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 1);
  char link[600];
  snprintf(link, sizeof link, "%s/host/current", t.root);
  ASSERT_OK(unlink(link));

  stage(t.root, "host", "pyagent-host", "9.9.9");
  uint64_t seq = 0;
  pa_upd_t u;
  char err[1024], id[256], recorded[256];
  ASSERT_EQ(pa_upd_prepare(t.root, installed, &seq, &u), PA_UPD_SWAPPED);
  ASSERT_STR_EQ(target_of(t.root, "host/current"), "9.9.9");
  ASSERT(exists(t.root, "host/installed.id") && !exists(t.root, "host/installed.id.tmp"));
  ASSERT_OK(pa_upd_file_id(installed, id, sizeof id));
  char path[600];
  snprintf(path, sizeof path, "%s/host/installed.id", t.root);
  FILE *f = fopen(path, "r");
  ASSERT(f != NULL);
  ASSERT(fgets(recorded, sizeof recorded, f) != NULL);
  fclose(f);
  ASSERT_STR_EQ(recorded, id);
  ASSERT_STR_CONTAINS(id, " ino=");
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 1);
  ASSERT_OK(pa_upd_commit(t.root, &seq, &u, err, sizeof err));
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 1);

  /* The package manager installs a newer host: the update no longer applies (the files stay). */
  replace_file(t.root, "inst/pyagent-host", "#!/bin/sh\necho installed 2\n");
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 0);
  ASSERT_STR_EQ(target_of(t.root, "host/current"), "9.9.9");
  /* Changed in place (same inode, another size) counts too. */
  put(t.root, "inst/pyagent-host", "#!/bin/sh\necho installed 1, changed\n", 0755);
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 0);
  /* A missing installed binary or a damaged installed.id: the installed binary is the safe choice. */
  char gone[620];
  snprintf(gone, sizeof gone, "%s.gone", installed);
  ASSERT_EQ(pa_upd_host_applies(t.root, gone), 0);
  put(t.root, "host/installed.id", "", 0600);
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 0);
  put(t.root, "host/installed.id", "garbage\n", 0600);
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 0);

  /* The next host update over a superseded link: its previous is the installed binary (""), and installed.id names
   * the installed binary as it is now. */
  mk(t.root, "host/10.0.0");
  put(t.root, "host/10.0.0/pyagent-host", "#!/bin/sh\nexit 0\n", 0755);
  stage(t.root, "host", "pyagent-host", "10.0.0");
  ASSERT_EQ(pa_upd_prepare(t.root, installed, &seq, &u), PA_UPD_SWAPPED);
  ASSERT_STR_EQ(u.previous, "");
  ASSERT_STR_EQ(target_of(t.root, "host/current"), "10.0.0");
  ASSERT_EQ(pa_upd_host_applies(t.root, installed), 1);
  ASSERT_OK(pa_upd_rollback(t.root, &seq, &u, "exit code 1", err, sizeof err));
  ASSERT(!exists(t.root, "host/current")); /* back on the installed binary, not the superseded 9.9.9 */

  /* A link that still applies stays the previous version of the next host update. */
  stage(t.root, "host", "pyagent-host", "9.9.9");
  ASSERT_EQ(pa_upd_prepare(t.root, installed, &seq, &u), PA_UPD_SWAPPED);
  ASSERT_OK(pa_upd_commit(t.root, &seq, &u, err, sizeof err)); /* prunes 10.0.0, not the previous: put it back */
  mk(t.root, "host/10.0.0");
  put(t.root, "host/10.0.0/pyagent-host", "#!/bin/sh\nexit 0\n", 0755);
  stage(t.root, "host", "pyagent-host", "10.0.0");
  ASSERT_EQ(pa_upd_prepare(t.root, installed, &seq, &u), PA_UPD_SWAPPED);
  ASSERT_STR_EQ(u.previous, "9.9.9");
  /* A bundle update never touches installed.id. */
  ASSERT_OK(pa_upd_commit(t.root, &seq, &u, err, sizeof err));
  unlink(path);
  bundle_version(t.root, "hello", "1.0");
  stage(t.root, "bundle", "hello", "1.0");
  ASSERT_EQ(pa_upd_prepare(t.root, installed, &seq, &u), PA_UPD_SWAPPED);
  ASSERT(!exists(t.root, "host/installed.id"));
  tmp_free(&t);
  return 0;
}

TEST_IMPL(supervisor_settings_probation) {
  static const char base[] =
      "{\"ok\": true, \"config\": \"/c\", \"state_dir\": \"/s\", \"log_level\": \"info\", \"supervisor\": "
      "{\"max_rss_mb\": 0, \"max_cpu_percent\": 0, \"check_interval_ms\": 5000, \"restart_min_ms\": 1000, "
      "\"restart_max_ms\": 60000, \"stable_ms\": 60000, \"crash_loop_count\": 5, \"crash_loop_window_ms\": 120000, "
      "\"stop_timeout_ms\": 5000%s}}";
  char json[1024], err[256];
  pa_sup_settings_t s;
  snprintf(json, sizeof json, base, "");
  ASSERT_OK(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err));
  ASSERT_UINT64_EQ(s.probation_ms, 30000); /* absent: the default */
  ASSERT_UINT64_EQ(s.probation_handshake_ms, 120000);
  pa_sup_settings_free(&s);
  snprintf(json, sizeof json, base, ", \"probation_ms\": 2000, \"probation_handshake_ms\": 4000");
  ASSERT_OK(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err));
  ASSERT_UINT64_EQ(s.probation_ms, 2000);
  ASSERT_UINT64_EQ(s.probation_handshake_ms, 4000);
  pa_sup_settings_free(&s);
  const char *bad[] = {", \"probation_ms\": 999", ", \"probation_ms\": 3600001", ", \"probation_ms\": \"5s\"",
                       ", \"probation_ms\": -1"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf(json, sizeof json, base, bad[i]);
    ASSERT_EQ(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err), -1);
    ASSERT(strstr(err, "supervisor.probation_ms") != NULL && strstr(err, "between 1000 and 3600000") != NULL);
  }
  snprintf(json, sizeof json, base, ", \"probation_handshake_ms\": 500");
  ASSERT_EQ(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err), -1);
  ASSERT(strstr(err, "supervisor.probation_handshake_ms") != NULL);
  pa_sup_action_t a;
  int ab;
  ASSERT(strcmp(pa_sup_classify(PA_WORKER_EXIT_UPDATE, 0, NULL, 0, &a, &ab), "update") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_NOW);
  ASSERT_EQ(ab, 0);
  return 0;
}
