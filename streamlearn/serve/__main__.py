"""`python -m streamlearn.serve ...`: the server, as `streamlearn serve ...` runs it."""

import sys

from streamlearn.cli.serve import main

sys.exit(main())
