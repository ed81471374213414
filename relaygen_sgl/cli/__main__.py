"""`python -m relaygen_sgl.cli`: the `relaygen` command."""

import sys

from relaygen_sgl.cli.main import main

sys.exit(main())
