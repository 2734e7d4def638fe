"""Roll a run back to one of its versions: `streamlearn restore`, as a script.

    python scripts/restore.py --run-dir checkpoints/default --step 3000
    python scripts/restore.py --run-dir checkpoints/default --original
"""

import sys

from streamlearn.cli.restore import main

if __name__ == "__main__":
  sys.exit(main())
