"""Score runs on held-out data, frozen and adapting: `streamlearn evaluate`, as a script.

    python scripts/evaluate.py checkpoints/default checkpoints/other@2000 --data held_out/
"""

import sys

from streamlearn.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
