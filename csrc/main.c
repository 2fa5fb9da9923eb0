/* pyagent-host: the agent host. `--version` is answered here without starting Python; everything else is the worker
 * (the supervisor comes with the updates work). */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <Python.h>
#include <jansson.h>
#include <openssl/opensslv.h>
#include <uv.h>

#include "embed.h"
#include "worker.h"

int main(int argc, char **argv) {
  if (argc > 1 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0)) {
    /* Py_GetVersion is safe before initialisation. */
    printf("pyagent-host %s (Python %.*s, libuv %s, %s, jansson %s)\n", PA_HOST_VERSION,
           (int)strcspn(Py_GetVersion(), " "), Py_GetVersion(), uv_version_string(), OPENSSL_VERSION_TEXT,
           JANSSON_VERSION);
    return 0;
  }
  signal(SIGPIPE, SIG_IGN);
  /* Short-lived tasks of the same executable (DESIGN §2): heavy, rare work that must stay out of the worker. */
  if (argc > 1 && strcmp(argv[1], "enroll") == 0) return pa_embed_run_task(argc, argv, "pyagent.runtime.enroll");
  return pa_embed_run(argc, argv);
}
