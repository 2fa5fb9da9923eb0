/* Embedding CPython: an isolated interpreter without site, the `_pyagent_host` built-in module, and the hand-over to
 * `pyagent.runtime.worker.main(argv)`. */
#ifndef PA_EMBED_H
#define PA_EMBED_H

/* Runs the worker; returns the process exit code. */
int pa_embed_run(int argc, char **argv);

#endif
