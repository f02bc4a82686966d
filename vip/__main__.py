"""`python -m vip …`: the same as the `vip` command (used as the Ray job entrypoint)."""
import sys

from vip.cli import main

sys.exit(main())
