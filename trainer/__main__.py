"""`python -m trainer ...` (what torchrun runs) is the `trainer` command."""

from trainer.cli import main

raise SystemExit(main())
