"""`python -m gpuflow.cli ...`: the same as the `gpuflow` command (and `python -m gpuflow`)."""

import sys

from . import main

sys.exit(main())
