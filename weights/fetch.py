#!/usr/bin/env python3
"""Fetch Xception's ImageNet weights into this folder.

    python weights/fetch.py            # notop file (the convolutional base)
    python weights/fetch.py --top      # with the 1000-class top
    python weights/fetch.py --dest DIR

Works from a fresh clone: the repository root is put on sys.path, so the
package need not be installed (``python -m minixcept.files.fetch`` is the same
command from an installed package). See README.md here for the sources and checksums.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minixcept.files.fetch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
