"""`python -m agent` is the `edge-agent` command."""

from agent.cli import main

raise SystemExit(main())
