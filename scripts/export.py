"""Export a run's version as an int8 artifact: `streamlearn export`, as a script.

    python scripts/export.py --run-dir checkpoints/default --out model.slm [--eval-data FILE]
"""

import sys

from streamlearn.cli.export import main

if __name__ == "__main__":
  sys.exit(main())
