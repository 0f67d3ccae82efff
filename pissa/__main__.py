"""`python -m pissa ...`: the pissa command, e.g. under `torchrun ... -m pissa train ...`."""

import sys

from pissa.cli import main

sys.exit(main())
