/* The supervisor's pure parts: settings from `check-config --json`, exit classification, crash-loop window, /proc
 * parsing, and the bounded restarts.jsonl. The process itself is tested end to end in
 * tests/python/integration/test_supervisor.py. */
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"
#include "supervisor.h"
#include "task.h"

#define SETTINGS(sup_extra)                                                                                         \
  "{\"ok\": true, \"config\": \"/etc/pyagent/agent.toml\", \"state_dir\": \"/var/lib/pyagent\", \"log_level\": "    \
  "\"info\", \"supervisor\": {\"max_rss_mb\": 64, \"max_cpu_percent\": 50.5, \"check_interval_ms\": 1000, "        \
  "\"restart_min_ms\": 500, \"restart_max_ms\": 30000, \"stable_ms\": 10000, \"crash_loop_count\": 4, "            \
  "\"crash_loop_window_ms\": 60000, \"stop_timeout_ms\": 3000" sup_extra "}}"

TEST_IMPL(supervisor_settings_full) {
  pa_sup_settings_t s;
  char err[256];
  const char *json = SETTINGS("");
  ASSERT_OK(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err));
  ASSERT(strcmp(s.config, "/etc/pyagent/agent.toml") == 0);
  ASSERT(strcmp(s.state_dir, "/var/lib/pyagent") == 0);
  ASSERT_EQ(s.log_level, PA_LOG_INFO);
  ASSERT_EQ(s.config_ok, 1);
  ASSERT(s.error == NULL);
  ASSERT_UINT64_EQ(s.max_rss_kb, 64 * 1024);
  ASSERT(s.max_cpu_percent > 50.4 && s.max_cpu_percent < 50.6);
  ASSERT_UINT64_EQ(s.check_interval_ms, 1000);
  ASSERT_UINT64_EQ(s.restart_min_ms, 500);
  ASSERT_UINT64_EQ(s.restart_max_ms, 30000);
  ASSERT_UINT64_EQ(s.stable_ms, 10000);
  ASSERT_EQ(s.crash_loop_count, 4);
  ASSERT_UINT64_EQ(s.crash_loop_window_ms, 60000);
  ASSERT_UINT64_EQ(s.stop_timeout_ms, 3000);
  pa_sup_settings_free(&s);
  return 0;
}

TEST_IMPL(supervisor_settings_bad_bundle_still_runs) {
  /* The file parsed but a bundle did not load: settings are there, ok is false, the error is kept. */
  const char *json =
      "{\"ok\": false, \"error\": \"bundle x: import failed\", \"config\": \"/c.toml\", \"state_dir\": \"/s\", "
      "\"log_level\": \"debug\", \"supervisor\": {\"max_rss_mb\": 0, \"max_cpu_percent\": 0, \"check_interval_ms\": "
      "5000, \"restart_min_ms\": 1000, \"restart_max_ms\": 60000, \"stable_ms\": 60000, \"crash_loop_count\": 5, "
      "\"crash_loop_window_ms\": 120000, \"stop_timeout_ms\": 5000}}";
  pa_sup_settings_t s;
  char err[256];
  ASSERT_OK(pa_sup_settings_parse(json, strlen(json), &s, err, sizeof err));
  ASSERT_EQ(s.config_ok, 0);
  ASSERT(strcmp(s.error, "bundle x: import failed") == 0);
  ASSERT_EQ(s.log_level, PA_LOG_DEBUG);
  pa_sup_settings_free(&s);
  return 0;
}

TEST_IMPL(supervisor_settings_errors) {
  static const struct {
    const char *json;
    const char *expect;
  } cases[] = {
      {"{\"ok\": false, \"error\": \"/c.toml: unknown key 'x'\"}", "/c.toml: unknown key 'x'"},
      {"not json", "invalid JSON"},
      {"[1]", "not a JSON object"},
      {"{\"state_dir\": \"/s\"}", "'ok'"},
      {SETTINGS(", \"max_rss_mb\": 1"), "duplicate"},
      {"{\"ok\": true, \"config\": \"rel.toml\", \"state_dir\": \"/s\", \"log_level\": \"info\", \"supervisor\": {}}",
       "absolute"},
      {"{\"ok\": true, \"config\": \"/c\", \"state_dir\": \"/s\", \"log_level\": \"loud\", \"supervisor\": {}}",
       "log_level"},
      {"{\"ok\": true, \"config\": \"/c\", \"state_dir\": \"/s\", \"log_level\": \"info\", \"supervisor\": {}}",
       "supervisor.max_rss_mb"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    pa_sup_settings_t s;
    char err[256] = "";
    ASSERT_EQ(pa_sup_settings_parse(cases[i].json, strlen(cases[i].json), &s, err, sizeof err), -1);
    if (!strstr(err, cases[i].expect)) ASSERT_FAILED("case %zu: '%s' does not mention '%s'", i, err, cases[i].expect);
    ASSERT(s.config == NULL && s.state_dir == NULL && s.error == NULL);
  }
  /* Out of range: check_interval_ms below 100. */
  char buf[2048];
  snprintf(buf, sizeof buf, "%s", SETTINGS(""));
  char *p = strstr(buf, "\"check_interval_ms\": 1000");
  ASSERT(p != NULL);
  memcpy(p, "\"check_interval_ms\":   10", 25);
  pa_sup_settings_t s;
  char err[256] = "";
  ASSERT_EQ(pa_sup_settings_parse(buf, strlen(buf), &s, err, sizeof err), -1);
  ASSERT(strstr(err, "supervisor.check_interval_ms") != NULL);
  return 0;
}

TEST_IMPL(supervisor_classify) {
  pa_sup_action_t a;
  int ab;
  ASSERT(strcmp(pa_sup_classify(0, 0, NULL, 0, &a, &ab), "stopped") == 0);
  ASSERT_EQ(a, PA_SUP_STOP);
  ASSERT_EQ(ab, 0);
  ASSERT(strcmp(pa_sup_classify(75, 0, NULL, 0, &a, &ab), "restart_requested") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_NOW);
  ASSERT_EQ(ab, 0);
  ASSERT(strcmp(pa_sup_classify(2, 0, NULL, 0, &a, &ab), "config_error") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_SLOW);
  ASSERT_EQ(ab, 1);
  ASSERT(strcmp(pa_sup_classify(3, 0, NULL, 0, &a, &ab), "enroll_refused") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_SLOW);
  ASSERT(strcmp(pa_sup_classify(1, 0, NULL, 0, &a, &ab), "exit") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_BACKOFF);
  ASSERT_EQ(ab, 1);
  ASSERT(strcmp(pa_sup_classify(0, SIGKILL, NULL, 0, &a, &ab), "signal") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_BACKOFF);
  ASSERT(strcmp(pa_sup_classify(0, SIGSEGV, NULL, 0, &a, &ab), "crash") == 0);
  ASSERT(strcmp(pa_sup_classify(0, SIGTERM, "rss_cap", 0, &a, &ab), "rss_cap") == 0);
  ASSERT_EQ(a, PA_SUP_RESTART_BACKOFF);
  ASSERT_EQ(ab, 1);
  /* Once the supervisor is stopping nothing is restarted, whatever the exit. */
  ASSERT(strcmp(pa_sup_classify(75, 0, NULL, 1, &a, &ab), "stopping") == 0);
  ASSERT_EQ(a, PA_SUP_STOP);
  ASSERT(strcmp(pa_sup_classify(0, SIGSEGV, "cpu_cap", 1, &a, &ab), "stopping") == 0);
  ASSERT_EQ(a, PA_SUP_STOP);
  return 0;
}

TEST_IMPL(supervisor_crash_loop_window) {
  static pa_sup_crashes_t c;
  memset(&c, 0, sizeof c);
  /* 3 within 1000 ms is a loop; spread out they are not. */
  ASSERT_EQ(pa_sup_crashes_note(&c, 0, 3, 1000), 0);
  ASSERT_EQ(pa_sup_crashes_note(&c, 600, 3, 1000), 0);
  ASSERT_EQ(pa_sup_crashes_note(&c, 1500, 3, 1000), 0); /* 0 fell out of the window */
  ASSERT_EQ(c.n, 2);
  ASSERT_EQ(pa_sup_crashes_note(&c, 1800, 3, 1000), 0); /* 600 fell out too */
  ASSERT_EQ(c.n, 2);
  ASSERT_EQ(pa_sup_crashes_note(&c, 1900, 3, 1000), 1);
  ASSERT_EQ(pa_sup_crashes_note(&c, 2000, 3, 1000), 1);
  /* The table never overflows. */
  memset(&c, 0, sizeof c);
  for (unsigned i = 0; i < 3 * PA_SUP_CRASH_LOOP_MAX; i++) pa_sup_crashes_note(&c, i, PA_SUP_CRASH_LOOP_MAX, 1u << 30);
  ASSERT_EQ(c.n, PA_SUP_CRASH_LOOP_MAX);
  ASSERT_UINT64_EQ(c.at_ms[PA_SUP_CRASH_LOOP_MAX - 1], 3 * PA_SUP_CRASH_LOOP_MAX - 1);
  return 0;
}

TEST_IMPL(supervisor_proc_parse) {
  uint64_t v = 0;
  ASSERT_OK(pa_sup_parse_statm("5120 1234 300 10 0 900 0\n", &v));
  ASSERT_UINT64_EQ(v, 1234);
  ASSERT_EQ(pa_sup_parse_statm("garbage", &v), -1);
  /* A command name with spaces and a ')' in it. */
  const char *stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0 100 1000 50\n";
  ASSERT_OK(pa_sup_parse_stat(stat, &v));
  ASSERT_UINT64_EQ(v, 22);
  ASSERT_EQ(pa_sup_parse_stat("42 (x) S 1 2", &v), -1);
  ASSERT_EQ(pa_sup_parse_stat("no parenthesis", &v), -1);
  /* The real file of this process parses. */
  char buf[1024];
  int fd = open("/proc/self/stat", O_RDONLY);
  ASSERT_GE(fd, 0);
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  ASSERT_GT(n, 0);
  buf[n] = '\0';
  ASSERT_OK(pa_sup_parse_stat(buf, &v));
  return 0;
}

TEST_IMPL(supervisor_restarts_bounded) {
  char dir[] = "/tmp/pa-sup-test-XXXXXX";
  ASSERT(mkdtemp(dir) != NULL);
  char path[256];
  snprintf(path, sizeof path, "%s/restarts.jsonl", dir);
  ASSERT_UINT64_EQ(pa_sup_last_seq(path), 0); /* no file yet */
  const size_t max = 4096;
  for (int i = 1; i <= 200; i++) {
    char line[128];
    snprintf(line, sizeof line, "{\"seq\":%d,\"reason\":\"signal\",\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}", i);
    ASSERT_OK(pa_sup_append_bounded(path, line, max));
    struct stat st;
    ASSERT_OK(stat(path, &st));
    ASSERT_LE(st.st_size, (int64_t)max);
  }
  ASSERT_UINT64_EQ(pa_sup_last_seq(path), 200);
  /* Every line left is a whole record, the newest ones, in order. */
  FILE *f = fopen(path, "r");
  ASSERT(f != NULL);
  char line[256];
  long prev = 0, lines = 0;
  while (fgets(line, sizeof line, f)) {
    json_t *rec = json_loads(line, 0, NULL);
    ASSERT(rec != NULL);
    long seq = (long)json_integer_value(json_object_get(rec, "seq"));
    if (prev) ASSERT_EQ(seq, prev + 1);
    prev = seq;
    lines++;
    json_decref(rec);
  }
  fclose(f);
  ASSERT_EQ(prev, 200);
  ASSERT_GE(lines, 20);
  /* A record too large for the bound is refused, not written. */
  char big[3000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  ASSERT_LT(pa_sup_append_bounded(path, big, max), 0);
  ASSERT_UINT64_EQ(pa_sup_last_seq(path), 200);
  unlink(path);
  rmdir(dir);
  return 0;
}
