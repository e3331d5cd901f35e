"""`python -m ila` (also what `accelerate launch -m ila` runs)."""

from ila.cli import main

raise SystemExit(main())
