"""`python -m gateway.cli`: the `mlx-manager` command."""

import sys

from gateway.cli import main

sys.exit(main())
