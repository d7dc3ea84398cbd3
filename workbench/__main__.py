"""`python -m workbench ...` (and `torchrun ... -m workbench capture ...`): the command line."""

import sys

from .cli import main

sys.exit(main())
