"""`python -m pyagent.cli ...` is the `pyagent` command."""

from pyagent.cli import main

raise SystemExit(main())
