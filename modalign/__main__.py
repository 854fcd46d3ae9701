"""``python -m modalign`` (also what ``accelerate launch -m modalign`` runs)."""

from modalign.cli import main

raise SystemExit(main())
