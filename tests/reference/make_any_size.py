"""TensorFlow references for Xception built for any input size, and Keras's parameter split.

    python tests/reference/generate.py any_size

keras.applications.Xception(include_top=False) with input_shape left out takes
(None, None, 3): any height and width from 71 up. Writes, beside this script:

    any_size_forward_224x224.npz    a cat photo at 224 x 224 through that model with the
    any_size_forward_180x240.npz    real notop weights, and the same photo at 180 x 240
                                    (height x width): every named layer's mean, standard
                                    deviation, max |a| and corner, and the pooled features
                                    (make_network.forward_summary)
    any_size_counts.npz             the parameter counts Keras's summary prints, trainable
                                    and non-trainable (batch-norm's moving statistics; every
                                    weight of a frozen layer), with and without the top and
                                    with every layer before block 14 frozen; multiply-adds
                                    of the notop model at 180 x 240

Nothing here imports minixcept.
"""
from pathlib import Path

import numpy as np

from make_network import (CATDOG, NOTOP_WEIGHTS, PHOTOS, forward_summary, keras_multiply_adds, keras_xception,
                          load_photos)

SIZES = ((224, 224), (180, 240))            # (height, width): a square and a non-square size
FROZEN_BEFORE = 'block14_sepconv1'          # fine-tuning block 14 only


def forward_fixture(height, width):
    return f'any_size_forward_{height}x{width}.npz'


def keras_split(keras_model):
    """(trainable, non-trainable) parameter counts, as Keras's summary computes them."""
    count = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # noqa: E731
    return count(keras_model.trainable_weights), count(keras_model.non_trainable_weights)


def freeze_before(keras_model, first_trainable):
    """layer.trainable = False for every layer before ``first_trainable`` (as fine-tuning does)."""
    for layer in keras_model.layers:
        if layer.name == first_trainable:
            break
        layer.trainable = False
    return keras_model


def make_forward(out_dir):
    model = keras_xception(None, NOTOP_WEIGHTS)
    assert tuple(model.input.shape) == (None, None, None, 3), model.input.shape
    for height, width in SIZES:
        images = load_photos(CATDOG, (height, width), PHOTOS[:1])
        np.savez_compressed(Path(out_dir) / forward_fixture(height, width), photo=np.array(PHOTOS[0]),
                            **forward_summary(model, images))


def make_counts(out_dir):
    notop, top = keras_xception(None), keras_xception(None, include_top=True)
    frozen = freeze_before(keras_xception(None), FROZEN_BEFORE)
    sized = keras_xception(SIZES[1] + (3,))
    counts = {}
    for key, model in (('notop', notop), ('top', top), ('notop_frozen_before_block14', frozen)):
        counts[f'trainable_{key}'], counts[f'non_trainable_{key}'] = keras_split(model)
    np.savez_compressed(Path(out_dir) / 'any_size_counts.npz', **counts,
                        notop_input_shape=np.array(notop.input.shape[1:], dtype=object).astype(str),
                        top_input_shape=np.array(top.input.shape[1:]),
                        multiply_adds_notop_180x240=keras_multiply_adds(sized))


def make(out_dir):
    if not NOTOP_WEIGHTS.exists():
        raise SystemExit(f'{NOTOP_WEIGHTS.name} is missing: run python weights/fetch.py first')
    make_forward(out_dir)
    make_counts(out_dir)
