"""``python -m minixcept.compare WEIGHTS.h5|MODEL.keras PHOTO...``: minixcept against Keras, layer by
layer, on your weights and photos. The work is done in ``minixcept.workflows.compare``."""
import sys

from minixcept.workflows.compare import main

if __name__ == '__main__':
    sys.exit(main())
