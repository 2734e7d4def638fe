"""`python -m streamlearn.run ...`: the main job, as `streamlearn run ...` runs it."""

import sys

from streamlearn.cli.run import main

sys.exit(main())
