"""python -m convcompiler: the same as the `convcompiler` command."""

import sys

from .inspection.cli import main

sys.exit(main())
