"""python -m convcompiler: the same as the `convcompiler` command."""

import sys

from .cli import main

sys.exit(main())
