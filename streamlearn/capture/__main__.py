"""`python -m streamlearn.capture ...`: capture, as `streamlearn capture ...` runs it."""

import sys

from streamlearn.cli.capture import main

sys.exit(main())
