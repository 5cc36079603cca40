"""Train the bundled byte-level model on the Python standard library (see jaxkv/train.py).

python scripts/train_tiny.py --out jaxkv/assets/tiny-py --steps 1300
"""

import sys

from jaxkv.train import main

if __name__ == "__main__":
    sys.exit(main())
