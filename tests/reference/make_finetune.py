"""TensorFlow reference for fine-tuning: one training step of blocks 13-14 and a dense head.

    python tests/reference/generate.py finetune

The second stage of the cats-vs-dogs recipe, as Keras runs it: ``keras.applications.
Xception(include_top=False)`` with the ImageNet weights and global average pooling,
every layer before block 13 frozen (``trainable = False``, which also keeps their
batch-norm in inference mode), a head Dense(256, relu) -> Dropout(0.5) -> Dense(1),
binary cross-entropy from the logit, and one GradientTape pass with
``training=True`` (block 13-14's batch-norm layers then use the batch's statistics
and move their moving statistics).

Two inputs are fixed so that minixcept can be given exactly the same ones:
- the head's weights, drawn from a seeded NumPy generator (``head_weights``);
- the dropout mask: Keras would draw its own, so the head multiplies by a fixed mask,
  the one a Dropout(0.5) keeps when it draws uniforms from
  ``numpy.random.default_rng(DROPOUT_SEED)`` and keeps a value where the draw >= 0.5
  (as minixcept's Dropout does with that generator).

Writes ``finetune_step.npz``: the four photos (uint8), labels, the loss and logits,
and for every trainable tensor its gradient's max |g|, L2 norm and a sample of
entries (the 128 largest and 384 at random); whole gradients of tensors up to
2,048 values (batch-norm gamma and beta, biases); the moving statistics of the
trainable batch-norm layers after the step. The live test compares every
gradient whole. Nothing here imports minixcept.
"""
from pathlib import Path

import numpy as np

from make_network import CATDOG, NOTOP_WEIGHTS, canonical_names, keras_xception, load_photos

# Two cats and two dogs from the training split, small enough to keep the test fast.
PHOTOS = ('train/cats/cat.1.jpg', 'train/dogs/dog.1.jpg', 'train/cats/cat.2.jpg', 'train/dogs/dog.2.jpg')
LABELS = np.array([0, 1, 0, 1])               # sorted class folders: cats 0, dogs 1
SIDE = 128                                    # block 14 is then 4 x 4
TRAIN_FROM = 'block13'
HEAD_UNITS = 256
DROPOUT_RATE = 0.5
HEAD_SEED, DROPOUT_SEED, SAMPLE_SEED = 13, 14, 15
WHOLE_UP_TO = 2048                            # tensors this small are stored whole
LARGEST, RANDOM = 128, 384                    # the sample kept of bigger ones


def head_weights(features=2048, units=HEAD_UNITS, seed=HEAD_SEED):
    """[kernel (features, units), bias (units,), kernel (units, 1), bias (1,)] float32, drawn
    uniformly at Glorot's scale; biases non-zero so that their gradients are tested too."""
    rng = np.random.default_rng(seed)
    hidden_limit = np.sqrt(6 / (features + units))
    logit_limit = np.sqrt(6 / (units + 1))
    return [rng.uniform(-hidden_limit, hidden_limit, (features, units)).astype(np.float32),
            rng.uniform(-0.05, 0.05, units).astype(np.float32),
            rng.uniform(-logit_limit, logit_limit, (units, 1)).astype(np.float32),
            np.array([0.1], np.float32)]


def dropout_mask(batch, units=HEAD_UNITS, rate=DROPOUT_RATE, seed=DROPOUT_SEED):
    """The inverted-dropout mask (batch, units): 0 where dropped, 1 / (1 - rate) where kept."""
    keep = np.random.default_rng(seed).random((batch, units)) >= rate
    return keep.astype(np.float32) / np.float32(1 - rate)


def keras_finetune_step(pixels, labels, weights_path=NOTOP_WEIGHTS, train_from=TRAIN_FROM, base_training=True,
                        dtype='float32'):
    """One Keras training step's numbers (nothing is updated but the moving statistics).

    pixels: uint8 (N, H, W, 3); labels: (N,) 0/1. base_training: the base is called with
    training=True (trainable batch-norm uses batch statistics) or, as Keras's transfer-learning
    guide recommends for fine-tuning, training=False (every batch-norm keeps its moving
    statistics; gamma and beta still get gradients). dtype: what Keras computes in (the
    head's weights and the mask are the same float32 numbers either way). Returns a dict with 'loss' (float),
    'logits' (N,), 'grads' {(layer, weight): gradient} for every trainable tensor, named as
    Keras 3 names them in a fresh process (head layers: 'head_dense', 'head_logit'), and
    'moving' {(layer, 'moving_mean'|'moving_variance'): value after the step} for the
    trainable batch-norm layers.
    """
    import keras
    import tensorflow as tf

    base = keras_xception(pixels.shape[1:], weights_path, dtype=dtype)
    names = canonical_names(base)
    first_trainable = next(i for i, name in enumerate(names) if name.startswith(f'{train_from}_'))
    for layer in base.layers[1:1 + first_trainable]:
        layer.trainable = False
    pool = keras.layers.GlobalAveragePooling2D(dtype=dtype)
    hidden = keras.layers.Dense(HEAD_UNITS, activation='relu', name='head_dense', dtype=dtype)
    logit = keras.layers.Dense(1, name='head_logit', dtype=dtype)
    hidden.build((None, base.output.shape[-1]))
    logit.build((None, HEAD_UNITS))
    kernel, bias, logit_kernel, logit_bias = head_weights(base.output.shape[-1])
    hidden.set_weights([kernel, bias])
    logit.set_weights([logit_kernel, logit_bias])
    mask = tf.constant(dropout_mask(len(pixels)), dtype=dtype)

    named = list(zip(names, base.layers[1:])) + [('head_dense', hidden), ('head_logit', logit)]
    variables, keys = [], []
    for name, layer in named:
        for variable in layer.trainable_weights:
            variables.append(variable)
            keys.append((name, variable.name))

    x = tf.constant(keras.applications.xception.preprocess_input(pixels.astype(np.float32)), dtype=dtype)
    y = tf.constant(np.asarray(labels).reshape(-1, 1), dtype=dtype)
    with tf.GradientTape() as tape:
        features = pool(base(x, training=base_training))
        logits = logit(hidden(features) * mask)
        loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype=dtype)(y, logits)
    grads = tape.gradient(loss, variables)

    moving = {}
    for name, layer in named[first_trainable:len(names)]:
        if type(layer).__name__ == 'BatchNormalization':
            moving[(name, 'moving_mean')] = np.asarray(layer.moving_mean)
            moving[(name, 'moving_variance')] = np.asarray(layer.moving_variance)
    return {'loss': float(loss), 'logits': np.asarray(logits).reshape(-1),
            'grads': {key: np.asarray(g) for key, g in zip(keys, grads)}, 'moving': moving}


def sample_positions(gradient, rng):
    """Flat positions of the ``LARGEST`` largest |g| and ``RANDOM`` others, sorted."""
    flat = np.abs(gradient).reshape(-1)
    largest = np.argsort(flat)[-LARGEST:]
    others = rng.choice(np.setdiff1d(np.arange(flat.size), largest), size=RANDOM, replace=False)
    return np.sort(np.concatenate([largest, others])).astype(np.int32)


def make(out_dir):
    pixels = load_photos(CATDOG, SIDE, PHOTOS)
    step = keras_finetune_step(pixels, LABELS)
    rng = np.random.default_rng(SAMPLE_SEED)
    arrays = {'photos': np.array(PHOTOS), 'pixels': pixels, 'labels': LABELS,
              'train_from': np.array(TRAIN_FROM), 'loss': np.float64(step['loss']), 'logits': step['logits'],
              'head_weight_sums': np.array([float(np.abs(w).sum()) for w in head_weights()]),
              'grad_keys': np.array([f'{layer}/{weight}' for layer, weight in step['grads']])}
    for (layer, weight), gradient in step['grads'].items():
        prefix = f'grad:{layer}/{weight}'
        arrays[f'{prefix}:max_abs'] = np.float64(np.abs(gradient).max())
        arrays[f'{prefix}:norm'] = np.float64(np.linalg.norm(gradient.astype(np.float64)))
        if gradient.size <= WHOLE_UP_TO:
            arrays[f'{prefix}:whole'] = gradient
        else:
            positions = sample_positions(gradient, rng)
            arrays[f'{prefix}:positions'] = positions
            arrays[f'{prefix}:values'] = gradient.reshape(-1)[positions]
    for (layer, statistic), value in step['moving'].items():
        arrays[f'moving:{layer}/{statistic}'] = value
    np.savez_compressed(Path(out_dir) / 'finetune_step.npz', **arrays)
