"""Make the TensorFlow reference fixtures that the tests compare minixcept against.

    python tests/reference/generate.py            # every fixture
    python tests/reference/generate.py layers     # only make_layers.py

Each ``make_*.py`` module beside this script has a ``make(out_dir)`` function that
writes small .npz files. TensorFlow runs on the CPU in float32 (TF32 is a GPU
format and would change the numbers). The TensorFlow and Keras versions are
recorded in ``versions.json``. Nothing here ever calls minixcept's own layers to
produce a reference value.
"""
import importlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))


def main(selected):
    import keras
    import numpy
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(False)
    makers = sorted(p.stem for p in HERE.glob('make_*.py'))
    if selected:
        makers = [m for m in makers if m[len('make_'):] in selected]
    versions_file = HERE / 'versions.json'
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
    for name in makers:
        print(f'{name} ...', flush=True)
        importlib.import_module(name).make(HERE)
        versions[name[len('make_'):]] = {'tensorflow': tf.__version__, 'keras': keras.__version__,
                                         'numpy': numpy.__version__}
    versions_file.write_text(json.dumps(versions, indent=2, sort_keys=True) + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
