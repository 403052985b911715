"""Entry point: `python -m kvproof`."""
from kvproof.cli import main
raise SystemExit(main())
