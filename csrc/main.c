/* pyagent-host: the agent host. `--version` is answered here without starting Python; with no arguments but
 * `--config FILE` it is the supervisor (csrc/supervisor.c, no Python); everything else is the worker or a task. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <Python.h>
#include <jansson.h>
#include <openssl/opensslv.h>
#include <uv.h>

#include "embed.h"

/* Said by --version so that `pyagent package` can refuse a host that can be crashed on purpose. */
#ifdef PYAGENT_RELEASE
#define PA_BUILD_FLAVOUR ""
#else
#define PA_BUILD_FLAVOUR " [test hooks]"
#endif
#include "supervisor.h"
#include "worker.h"

/* The supervisor runs when the arguments are only `--config FILE` / `--config=FILE` (or none); anything else
 * (--foreground, check-config, --help, a typo) goes to the worker, which owns usage messages. */
static int wants_supervisor(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--config") == 0 && i + 1 < argc && argv[i + 1][0]) i++;
    else if (strncmp(argv[i], "--config=", 9) != 0 || !argv[i][9]) return 0;
  }
  return 1;
}

/* A worker started by a supervisor dies with it (SIGTERM, the normal shutdown), so a new supervisor never finds an
 * orphaned worker on its state directory. The variable is not passed on to the worker's own children; in its place
 * PYAGENT_SUPERVISED tells the runtime that a supervisor runs it (updates need one), and the runtime removes that
 * one from its environment as it starts. */
static int follow_supervisor(void) {
  const char *sup = getenv("PYAGENT_SUPERVISOR_PID");
  if (!sup) return 0;
  long pid = strtol(sup, NULL, 10);
  setenv("PYAGENT_SUPERVISED", sup, 1);
  unsetenv("PYAGENT_SUPERVISOR_PID");
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) return 0;
  if (pid > 0 && getppid() != (pid_t)pid) {
    fprintf(stderr, "pyagent-host: the supervisor (pid %ld) is gone; the worker does not start\n", pid);
    return -1;
  }
  return 0;
}

/* The updater task (`pyagent-host update`, started by the worker) lives no longer than the worker that started it:
 * an updater left behind by a killed worker could otherwise write STATE/updates/staged.json under the next one. The
 * parent is read before prctl and checked again after it, so a parent that died in between is not missed. (The
 * signal follows the parent *thread* that forked: the worker starts the updater from its event loop, in its main
 * thread, which lives as long as the worker.) */
static int follow_parent(void) {
  pid_t parent = getppid();
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) {
    perror("pyagent-host: prctl(PR_SET_PDEATHSIG)");
    return -1;
  }
  if (getppid() != parent) {
    fprintf(stderr, "pyagent-host: the process that started the update task (pid %ld) is gone; not updating\n",
            (long)parent);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0)) {
    /* Py_GetVersion is safe before initialisation. */
    printf("pyagent-host %s (Python %.*s, libuv %s, %s, jansson %s)%s\n", PA_HOST_VERSION,
           (int)strcspn(Py_GetVersion(), " "), Py_GetVersion(), uv_version_string(), OPENSSL_VERSION_TEXT,
           JANSSON_VERSION, PA_BUILD_FLAVOUR);
    return 0;
  }
  signal(SIGPIPE, SIG_IGN);
  if (wants_supervisor(argc, argv)) return pa_supervisor_main(argc, argv);
  if (follow_supervisor() != 0) return 1;
  /* Short-lived tasks of the same executable (DESIGN §2): heavy, rare work that must stay out of the worker. */
  if (argc > 1 && strcmp(argv[1], "enroll") == 0) return pa_embed_run_task(argc, argv, "pyagent.runtime.enroll");
  if (argc > 1 && strcmp(argv[1], "update") == 0) {
    if (follow_parent() != 0) return 1;
    return pa_embed_run_task(argc, argv, "pyagent.runtime.updater");
  }
  return pa_embed_run(argc, argv);
}
