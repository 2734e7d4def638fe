"""`python -m streamlearn ...`: the same as the installed `streamlearn` command."""

import sys

from streamlearn.cli.main import main

sys.exit(main())
