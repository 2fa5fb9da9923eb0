/* Embedding CPython: an isolated interpreter without site, the `_pyagent_host` built-in module, and the hand-over to
 * `pyagent.runtime.worker.main(argv)`. */
#ifndef PA_EMBED_H
#define PA_EMBED_H

/* Runs the worker; returns the process exit code. */
int pa_embed_run(int argc, char **argv);
/* Runs a short-lived task: `module.main(argv[2:])` (argv[1] names the task). Unlike the worker it may import `ssl`. */
int pa_embed_run_task(int argc, char **argv, const char *module);

#endif
