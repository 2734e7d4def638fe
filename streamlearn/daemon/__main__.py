"""`python -m streamlearn.daemon ...`: the daemon, as `streamlearn daemon ...` runs it."""

import sys

from streamlearn.cli.daemon import main

sys.exit(main())
