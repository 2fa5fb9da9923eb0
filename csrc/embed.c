/* The interpreter and the `_pyagent_host` module. Everything Python-facing is here; the rest of the host never includes
 * Python.h. Rules (STYLE.md): every PyStatus is checked, PyConfig_Clear runs on every path, C errors become one
 * exception type (`_pyagent_host.error`), and no Python exception ever unwinds into libuv (the libuv thread never
 * calls into Python at all). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "embed.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bridge.h"
#include "crash.h"
#include "log.h"
#include "worker.h"

#define TO_PY_LIMIT (256u << 20) /* bytes waiting for a stuck Python loop before frames are dropped */

static pa_bridge_t pa__bridge;
static int pa__bridge_ready;
static PyObject *HostError;

static PyObject *host_start(PyObject *self, PyObject *arg) {
  Py_buffer view;
  if (PyUnicode_Check(arg)) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!s) return NULL;
    char err[512];
    if (pa_worker_start(s, (size_t)n, &pa__bridge, err, sizeof err)) {
      PyErr_SetString(HostError, err);
      return NULL;
    }
    Py_RETURN_NONE;
  }
  if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
  char err[512];
  int rc = pa_worker_start(view.buf, (size_t)view.len, &pa__bridge, err, sizeof err);
  PyBuffer_Release(&view);
  if (rc) {
    PyErr_SetString(HostError, err);
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *host_stop(PyObject *self, PyObject *args) {
  unsigned int timeout_ms = 2000;
  if (!PyArg_ParseTuple(args, "|I:stop", &timeout_ms)) return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS rc = pa_worker_stop(timeout_ms);
  Py_END_ALLOW_THREADS if (rc) {
    PyErr_Format(HostError, "the libuv thread did not stop within %u ms", timeout_ms);
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *host_fileno(PyObject *self, PyObject *unused) { return PyLong_FromLong(pa__bridge.efd); }

static PyObject *host_recv(PyObject *self, PyObject *unused) {
  pa_buf_t out = {0};
  pa_bridge_take_py(&pa__bridge, &out);
  PyObject *b = PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.len);
  pa_buf_free(&out);
  return b;
}

static PyObject *host_send(PyObject *self, PyObject *arg) {
  Py_buffer view;
  if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
  int rc = view.len ? pa_bridge_put_c(&pa__bridge, view.buf, (size_t)view.len) : 0;
  PyBuffer_Release(&view);
  if (rc) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject *host_log(PyObject *self, PyObject *args) {
  int level;
  const char *line;
  if (!PyArg_ParseTuple(args, "is:log", &level, &line)) return NULL;
  pa_log_line(level, line);
  Py_RETURN_NONE;
}

static PyObject *host_version(PyObject *self, PyObject *unused) { return PyUnicode_FromString(PA_HOST_VERSION); }

static PyObject *host_stats(PyObject *self, PyObject *unused) {
  json_t *stats = pa_worker_stats();
  char *s = stats ? json_dumps(stats, JSON_COMPACT) : NULL;
  json_decref(stats);
  if (!s) return PyErr_NoMemory();
  PyObject *json = PyImport_ImportModule("json");
  PyObject *res = json ? PyObject_CallMethod(json, "loads", "s", s) : NULL;
  Py_XDECREF(json);
  free(s);
  return res;
}

/* crash_init(dir, handler, annotations, allow_test_crashes): see crash.h. */
static PyObject *host_crash_init(PyObject *self, PyObject *args) {
  PyObject *dir_obj = NULL, *handler_obj = NULL, *annotations;
  int allow_test = 0;
  if (!PyArg_ParseTuple(args, "O&OO!p:crash_init", PyUnicode_FSConverter, &dir_obj, &handler_obj, &PyDict_Type,
                        &annotations, &allow_test))
    return NULL;
  PyObject *handler_bytes = NULL;
  if (handler_obj != Py_None && !PyUnicode_FSConverter(handler_obj, &handler_bytes)) {
    Py_DECREF(dir_obj);
    return NULL;
  }
  const char *items[PA_CRASH_MAX_ANNOTATIONS];
  PyObject *owned[PA_CRASH_MAX_ANNOTATIONS];
  size_t n = 0;
  int ok = 1;
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (ok && PyDict_Next(annotations, &pos, &key, &value)) {
    if (n == PA_CRASH_MAX_ANNOTATIONS) {
      PyErr_Format(PyExc_ValueError, "at most %d crash annotations", PA_CRASH_MAX_ANNOTATIONS);
      ok = 0;
      break;
    }
    if (!PyUnicode_Check(key) || !PyUnicode_Check(value)) {
      PyErr_SetString(PyExc_TypeError, "crash annotations must map str to str");
      ok = 0;
      break;
    }
    owned[n] = PyUnicode_FromFormat("%U=%U", key, value);
    items[n] = owned[n] ? PyUnicode_AsUTF8(owned[n]) : NULL;
    if (!items[n]) {
      Py_XDECREF(owned[n]);
      ok = 0;
      break;
    }
    n++;
  }
  char err[512] = "";
  int rc = 0;
  if (ok)
    rc = pa_crash_init(PyBytes_AS_STRING(dir_obj), handler_bytes ? PyBytes_AS_STRING(handler_bytes) : NULL, items, n,
                       allow_test, err, sizeof err);
  for (size_t i = 0; i < n; i++) Py_DECREF(owned[i]);
  Py_DECREF(dir_obj);
  Py_XDECREF(handler_bytes);
  if (!ok) return NULL;
  if (rc) {
    PyErr_SetString(HostError, err);
    return NULL;
  }
  Py_RETURN_NONE;
}

#ifndef PYAGENT_RELEASE
/* crash_test(kind, thread): crash the process on purpose (tests only; refused unless allowed by crash_init). */
static PyObject *host_crash_test(PyObject *self, PyObject *args) {
  const char *kind_s, *thread_s;
  if (!PyArg_ParseTuple(args, "ss:crash_test", &kind_s, &thread_s)) return NULL;
  int kind = strcmp(kind_s, "segv") == 0             ? PA_CRASH_SEGV
             : strcmp(kind_s, "abort") == 0          ? PA_CRASH_ABORT
             : strcmp(kind_s, "stack_overflow") == 0 ? PA_CRASH_STACK_OVERFLOW
                                                     : 0;
  int thread = strcmp(thread_s, "main") == 0 ? PA_CRASH_THREAD_MAIN : strcmp(thread_s, "libuv") == 0 ? PA_CRASH_THREAD_LIBUV : 0;
  if (!kind) return PyErr_Format(PyExc_ValueError, "unknown crash kind '%s' (segv, abort, stack_overflow)", kind_s);
  if (!thread) return PyErr_Format(PyExc_ValueError, "unknown thread '%s' (main, libuv)", thread_s);
  int rc = pa_crash_test(kind, thread);
  if (rc == -EPERM) return PyErr_Format(HostError, "test crashes are not allowed ([crash] allow_test_crashes)");
  if (rc == -ESRCH) return PyErr_Format(HostError, "the libuv thread is not running");
  if (rc) return PyErr_Format(HostError, "crash_test failed: %s", strerror(rc < 0 ? -rc : rc));
  Py_RETURN_NONE;
}
#endif

static PyMethodDef host_methods[] = {
    {"start", host_start, METH_O, "start(config_json): start the libuv thread with the host config."},
    {"stop", host_stop, METH_VARARGS, "stop(timeout_ms=2000): flush, close the sessions, join the libuv thread."},
    {"fileno", host_fileno, METH_NOARGS, "fileno(): the eventfd that is readable while lines wait for Python."},
    {"recv", host_recv, METH_NOARGS, "recv(): every queued line as bytes (b'' when none)."},
    {"send", host_send, METH_O, "send(data): queue complete '<session> <json>\\n' lines for the host."},
    {"log", host_log, METH_VARARGS, "log(level, line): write a key=value line through the host logger."},
    {"version", host_version, METH_NOARGS, "version(): the host version."},
    {"stats", host_stats, METH_NOARGS, "stats(): sessions and counters."},
    {"crash_init", host_crash_init, METH_VARARGS,
     "crash_init(dir, handler, annotations, allow_test_crashes): install the fatal-signal handlers."},
#ifndef PYAGENT_RELEASE
    {"crash_test", host_crash_test, METH_VARARGS, "crash_test(kind, thread): crash on purpose (tests only)."},
#endif
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef host_module = {PyModuleDef_HEAD_INIT, "_pyagent_host",
                                         "The pyagent host's bridge to the Python runtime.", -1, host_methods,
                                         NULL, NULL, NULL, NULL};

static PyObject *PyInit__pyagent_host(void) {
  if (!pa__bridge_ready) {
    if (pa_bridge_init(&pa__bridge, TO_PY_LIMIT)) {
      PyErr_SetFromErrno(PyExc_OSError);
      return NULL;
    }
    pa__bridge_ready = 1;
  }
  PyObject *m = PyModule_Create(&host_module);
  if (!m) return NULL;
  HostError = PyErr_NewException("_pyagent_host.error", NULL, NULL);
  if (!HostError || PyModule_AddObjectRef(m, "error", HostError) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}

/* ---- interpreter ------------------------------------------------------------------------------------------------- */

static int append_path(PyObject *path, const char *dir, int front) {
  PyObject *s = PyUnicode_DecodeFSDefault(dir);
  if (!s) return -1;
  int rc = front ? PyList_Insert(path, 0, s) : PyList_Append(path, s);
  Py_DECREF(s);
  return rc;
}

/* The path the interpreter is located from: normally our own executable; PYAGENT_HOST_HOME/pyagent-host when that
 * variable names a directory. A host installed by an update runs from STATE/host/current/pyagent-host, with no venv
 * or python directory beside it; the supervisor then points PYAGENT_HOST_HOME at the directory of the installed
 * host, whose Python environment the new host uses (docs/updates.md §3). The variable stays in the environment so
 * that the tasks this process starts (`update`, `enroll`) find the same environment. 0 or -1. */
static int host_exe_path(char *out, size_t cap) {
  const char *home = getenv("PYAGENT_HOST_HOME");
  if (home && *home) {
    int n = snprintf(out, cap, "%s/pyagent-host", home);
    return n > 0 && (size_t)n < cap ? 0 : -1;
  }
  if (cap < 2) return -1;
  ssize_t n = readlink("/proc/self/exe", out, cap - 1);
  if (n <= 0) return -1;
  out[n] = '\0';
  return 0;
}

/* The directory the runtime is installed under: the venv the host was installed into when there is one (a
 * pyvenv.cfg beside or above our executable; in 3.11 it is `site`, which we do not run, that would set sys.prefix to
 * it), else the interpreter's prefix. Without a venv, a `python` directory beside our bin directory is the packaged
 * layout (the .deb/.rpm install /usr/lib/pyagent/{bin,python,bundles}): `*packaged` is set and `out` names that
 * directory, which goes on sys.path as it is. "Our executable" is the one host_exe_path names. */
static void install_root(char *out, size_t cap, int *packaged) {
  char exe[PATH_MAX], cfg[PATH_MAX + 32];
  out[0] = '\0';
  *packaged = 0;
  if (host_exe_path(exe, sizeof exe) < 0) return;
  char *slash = strrchr(exe, '/');
  if (!slash) return;
  *slash = '\0'; /* exe is now the bin directory */
  snprintf(cfg, sizeof cfg, "%s/../pyvenv.cfg", exe);
  if (access(cfg, F_OK) == 0) {
    snprintf(out, cap, "%s/..", exe);
    return;
  }
  snprintf(cfg, sizeof cfg, "%s/pyvenv.cfg", exe);
  if (access(cfg, F_OK) == 0) {
    snprintf(out, cap, "%s", exe);
    return;
  }
  snprintf(cfg, sizeof cfg, "%s/../python", exe);
  char resolved[PATH_MAX];
  struct stat st;
  if (stat(cfg, &st) == 0 && S_ISDIR(st.st_mode) && realpath(cfg, resolved) && strlen(resolved) < cap) {
    snprintf(out, cap, "%s", resolved);
    *packaged = 1;
  }
}

/* sys.path after init (3.11 does not recompute search paths from a changed config): the stdlib comes from the
 * interpreter; we add the site-packages of the install root (or, installed from a package, its python directory),
 * and PYAGENT_PYTHONPATH in front. */
static int setup_paths(void) {
  PyObject *path = PySys_GetObject("path"); /* borrowed */
  if (!path || !PyList_Check(path)) return -1;
  char root[PATH_MAX];
  int packaged;
  install_root(root, sizeof root, &packaged);
  if (packaged) {
    if (append_path(path, root, 0) < 0) return -1;
  } else if (!root[0]) {
    PyObject *prefix = PySys_GetObject("prefix"); /* borrowed */
    PyObject *bytes = prefix ? PyUnicode_EncodeFSDefault(prefix) : NULL;
    if (!bytes) return -1;
    snprintf(root, sizeof root, "%s", PyBytes_AS_STRING(bytes));
    Py_DECREF(bytes);
  }
  if (!packaged) {
    char dir[PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/lib/python%d.%d/site-packages", root, PY_MAJOR_VERSION, PY_MINOR_VERSION);
    if (access(dir, F_OK) == 0 && append_path(path, dir, 0) < 0) return -1;
  }
  const char *extra = getenv("PYAGENT_PYTHONPATH");
  if (extra && *extra) {
    char *copy = strdup(extra), *save = NULL;
    if (!copy) return -1;
    /* Insert in reverse so the first entry ends up first. */
    char *parts[64];
    int n = 0;
    for (char *tok = strtok_r(copy, ":", &save); tok && n < 64; tok = strtok_r(NULL, ":", &save)) parts[n++] = tok;
    for (int i = n - 1; i >= 0; i--)
      if (append_path(path, parts[i], 1) < 0) {
        free(copy);
        return -1;
      }
    free(copy);
  }
  return 0;
}

static int init_interpreter(int argc, char **argv) {
  PyConfig config;
  PyConfig_InitIsolatedConfig(&config);
  config.site_import = 0;
  config.install_signal_handlers = 1; /* Python's main thread owns SIGINT/SIGTERM; SIGPIPE is ignored */
  config.write_bytecode = 0;
  config.parse_argv = 0;
  PyStatus status = PyConfig_SetBytesArgv(&config, argc, argv);
  if (PyStatus_Exception(status)) goto fail;
  /* program_name from /proc/self/exe (or PYAGENT_HOST_HOME) lets getpath find the venv (pyvenv.cfg) the host was
   * installed into. */
  char exe[PATH_MAX];
  if (host_exe_path(exe, sizeof exe) == 0) {
    status = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (PyStatus_Exception(status)) goto fail;
  }
  status = Py_InitializeFromConfig(&config);
  if (PyStatus_Exception(status)) goto fail;
  PyConfig_Clear(&config);
  return 0;

fail:
  PyConfig_Clear(&config);
  if (PyStatus_IsExit(status)) return status.exitcode;
  fprintf(stderr, "pyagent-host: cannot initialise Python: %s%s%s\n", status.func ? status.func : "",
          status.func ? ": " : "", status.err_msg ? status.err_msg : "unknown error");
  return -1;
}

/* What run_runtime imports: the worker by default; a short-lived task (pa_embed_run_task) otherwise. */
static const char *pa__module = "pyagent.runtime.worker";
static int pa__task_argv_skip = 1; /* argv entries before the module's own arguments */

static int run_runtime(int argc, char **argv) {
  if (setup_paths() < 0) {
    PyErr_Print();
    return 1;
  }
  /* The host does TLS; keeping `ssl` out of the worker saves ~4 MB (asyncio imports it only if it can). Short-lived
   * tasks (enrollment) may use it. */
  if (pa__task_argv_skip == 1 && PyDict_SetItemString(PyImport_GetModuleDict(), "ssl", Py_None) < 0) {
    PyErr_Print();
    return 1;
  }
  PyObject *mod = PyImport_ImportModule(pa__module);
  if (!mod) {
    fprintf(stderr, "pyagent-host: cannot import the pyagent runtime (is pyagent installed next to the host, or "
                    "PYAGENT_PYTHONPATH set?):\n");
    PyErr_Print();
    return 1;
  }
  PyObject *args = PyList_New(0);
  for (int i = pa__task_argv_skip; args && i < argc; i++) {
    PyObject *s = PyUnicode_DecodeFSDefault(argv[i]);
    if (!s || PyList_Append(args, s) < 0) {
      Py_XDECREF(s);
      Py_CLEAR(args);
      break;
    }
    Py_DECREF(s);
  }
  PyObject *res = args ? PyObject_CallMethod(mod, "main", "O", args) : NULL;
  Py_XDECREF(args);
  Py_DECREF(mod);
  int code = 1;
  if (!res) {
    PyErr_Print();
  } else {
    long v = PyLong_AsLong(res);
    if (v == -1 && PyErr_Occurred()) PyErr_Print();
    else code = (int)v;
    Py_DECREF(res);
  }
  return code;
}

int pa_embed_run_task(int argc, char **argv, const char *module) {
  pa__module = module;
  pa__task_argv_skip = 2;
  return pa_embed_run(argc, argv);
}

int pa_embed_run(int argc, char **argv) {
  if (PyImport_AppendInittab("_pyagent_host", PyInit__pyagent_host) < 0) {
    fprintf(stderr, "pyagent-host: cannot register _pyagent_host\n");
    return 1;
  }
  int rc = init_interpreter(argc, argv);
  if (rc) return rc < 0 ? 1 : rc;
  int code = run_runtime(argc, argv);
  if (pa_worker_running() && pa_worker_stop(2000)) {
    /* The libuv thread is stuck: finalising under it would be unsafe, leave without it. */
    fflush(NULL);
    _exit(code ? code : 1);
  }
  if (Py_FinalizeEx() < 0 && code == 0) code = 120;
  if (pa__bridge_ready) pa_bridge_free(&pa__bridge);
  return code;
}
