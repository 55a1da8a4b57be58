"""`python -m gpuflow ...`: the same as the `gpuflow` command."""

import sys

from gpuflow.cli import main

sys.exit(main())
