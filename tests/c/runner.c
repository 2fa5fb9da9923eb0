/* pa-tests: `pa-tests NAME` runs one test (how ctest runs them, one process each), `pa-tests --list` prints the
 * names, and `pa-tests` alone runs them all in this process, stopping at the first failed assertion. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "test-list.h"

static int run(const pa_task_entry_t *t) {
  fprintf(stderr, "-- %s\n", t->name);
  int rc = t->main();
  fprintf(stderr, "-- %s: %s\n", t->name, rc == 0 ? "ok" : rc == PA_TEST_SKIP ? "skipped" : "FAILED");
  return rc;
}

int main(int argc, char **argv) {
  /* Tests write to sockets whose peer may have gone; a failed write must be an error code, not a signal. */
  signal(SIGPIPE, SIG_IGN);
  setvbuf(stdout, NULL, _IONBF, 0);
  setvbuf(stderr, NULL, _IONBF, 0);

  if (argc == 2 && strcmp(argv[1], "--list") == 0) {
    for (const pa_task_entry_t *t = pa_tasks; t->name; t++) printf("%s\n", t->name);
    return 0;
  }
  if (argc == 2) {
    for (const pa_task_entry_t *t = pa_tasks; t->name; t++)
      if (strcmp(t->name, argv[1]) == 0) {
        int rc = run(t);
        return rc == 0 ? 0 : rc == PA_TEST_SKIP ? PA_TEST_SKIP : 1;
      }
    fprintf(stderr, "pa-tests: no test named '%s' (try --list)\n", argv[1]);
    return 2;
  }
  if (argc > 2) {
    fprintf(stderr, "usage: pa-tests [--list | NAME]\n");
    return 2;
  }
  int failed = 0;
  for (const pa_task_entry_t *t = pa_tasks; t->name; t++) {
    int rc = run(t);
    failed += rc != 0 && rc != PA_TEST_SKIP;
  }
  return failed ? 1 : 0;
}
