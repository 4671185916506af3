"""`python -m atpdsl.cli ...`: the same as the `atpdsl` command."""
import sys

from atpdsl.cli import main

sys.exit(main())
