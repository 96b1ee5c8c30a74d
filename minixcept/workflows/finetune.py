"""Fine-tuning: train the top blocks of a pretrained Xception together with its new head.

The second stage of the transfer-learning recipe. A head (Dense -> Dropout -> Dense)
has been trained on frozen bottleneck features; now the last block(s) of the
convolutional base are unfrozen and trained further, with the head, at a small
learning rate, so the base's most specific features adapt to the new classes
without the large early gradients of an untrained head wrecking them.

Freezing works as in Keras:

- every layer before the first layer of the chosen block gets ``trainable = False``;
  the optimizer leaves its weights alone, and a frozen BatchNormalization runs in
  inference mode (moving statistics) even in a training step;
- trainable batch-norm layers keep normalising with their moving statistics, which
  stay as they are, while gamma and beta train (``bn_statistics='moving'``, the
  default): what Keras's own transfer-learning guide recommends, calling the base
  with training=False;
- the backward pass stops at the first trainable layer: nothing below it needs a
  gradient.

Batch statistics (``bn_statistics='batch'``, Keras's trainable=True called with
training=True) are there on request, and have a price here. A head trained on
features made with the ImageNet moving statistics sees different features as soon
as block 14's batch-norm normalises with the statistics of a batch of cats and dogs:
on 200 training photos at 299 px, the bottleneck head's loss goes from 0.005 to 0.24
and its accuracy from 100% to 93% with no weight changed. Fine-tuning then spends its
first epochs recovering (3 augmented epochs on the shared photos: 98.99% against the
99.14% that the moving statistics held).

With ``fast`` (the default) the trainable part of the base runs on the training engine
kept for it (``minixcept.engines.training``) and the frozen part on the inference engine;
``fast=False`` runs the plain layers throughout. The head, a few Dense layers, always runs
its plain layers.

Since the frozen part never changes, its output can be computed once per photo
and reused ("cached") whenever the photo is seen again unchanged; with
augmentation every step sees new pixels, so the frozen part runs each time, under
``no_grad()`` (it keeps no caches for a backward pass that will not come).

    base = Xception(include_top=False, pooling='avg', weights='imagenet')
    head.load_weights('head.h5')
    network = FineTuneModel(base, head, train_from='block14')
    x_val = cache_frozen_features(network, validation_pixels)          # computed once
    x_train = FrozenFeatureFeed(network, train_pixels, rng=np.random.default_rng(0))  # augmented
    fit(network, x_train, train_labels, BinaryCrossentropy(from_logits=True),
        SGD(1e-4, momentum=0.9), epochs=3, validation_data=(x_val, validation_labels))
"""
import time

import numpy as np

from .. import backend
from ..engines.inference import engine_for as inference_engine
from ..engines.training import engine_for as training_engine
from ..files.augment import AugmentSettings, augment_batch
from ..xception import preprocess_input
from ..layers.base import no_grad


def first_layer_of_block(model, block):
    """The name of the first layer whose name starts with ``block + '_'`` (e.g. 'block14_sepconv1').

    Xception's shortcut layers (``conv2d_3``, ``batch_normalization_3``, ``add_10``...) carry
    no block name; they come after the first layer of their block, so they train with it.
    """
    for layer in model.layers:
        if layer.name.startswith(f'{block}_'):
            return layer.name
    blocks = sorted({layer.name.split('_')[0] for layer in model.layers if layer.name.startswith('block')},
                    key=lambda name: int(name[len('block'):]))
    raise ValueError(f"model {model.name!r} has no block {block!r}; it has {', '.join(blocks)}")


def freeze_before(model, block):
    """Freeze every layer before the first layer of ``block``; make the rest trainable.

    Returns the name of the first trainable layer.
    """
    first_trainable = first_layer_of_block(model, block)
    frozen = True
    for layer in model.layers:
        frozen = frozen and layer.name != first_trainable
        layer.trainable = not frozen
    return first_trainable


def frozen_output_name(model, first_trainable):
    """The one tensor that carries the frozen part's result into the trainable part.

    None when nothing is frozen (the trainable part reads the input). Raises ValueError when
    the trainable part reads more than one frozen tensor (a cut inside a residual block).
    """
    names = [layer.name for layer in model.layers]
    position = names.index(first_trainable)
    produced_before = {'input'} | set(names[:position])
    read = {name for node in model.nodes[position:] for name in node.inputs if name in produced_before}
    if len(read) != 1:
        raise ValueError(f"training from {first_trainable!r} would read {sorted(read)} from the frozen "
                         f"part; start at the first layer of a block instead")
    (name,) = read
    return None if name == 'input' else name


class FineTuneModel:
    """A convolutional base and a head, trained together from one block of the base onward.

    base: a Model from images (N, H, W, 3) to pooled features (N, D), e.g.
    ``Xception(include_top=False, pooling='avg')``; head: a Model from (N, D) to logits (N, 1).

    The model's input is the frozen part's output (``frozen_features(images)``, e.g.
    (N, 10, 10, 1024) when training from block14 at 299 px), so the same model trains on
    outputs cached once per photo and on outputs computed afresh from augmented photos.
    With nothing frozen (``train_from='block1'``) the input is the images themselves.
    It has the ``forward``, ``backward``, ``layers`` and ``get_layer`` that ``workflows.fit`` uses.
    fast: run the base on the engines (the frozen part on the inference engine, the trainable
    part on the training engine), else on its plain layers; the same numbers to float32 rounding.
    bn_statistics: 'moving' (the default: the base always runs in inference mode, as Keras's
    guide recommends) or 'batch' (Keras's trainable=True: a training step normalises with the
    batch's statistics and moves the moving ones).
    """

    def __init__(self, base, head, train_from='block14', fast=True, bn_statistics='moving'):
        if bn_statistics not in ('batch', 'moving'):
            raise ValueError(f"bn_statistics must be 'batch' or 'moving', got {bn_statistics!r}")
        self.base, self.head = base, head
        self.train_from = train_from
        self.bn_statistics = bn_statistics
        self.first_trainable = freeze_before(base, train_from)
        self.frozen_output = frozen_output_name(base, self.first_trainable)
        self.fast = fast
        # the runner of the trainable part: the training engine kept for the base, or the base
        self.base_runner = training_engine(base) if fast else base

    @property
    def layers(self):
        return self.base.layers + self.head.layers

    def get_layer(self, name):
        try:
            return self.base.get_layer(name)
        except KeyError:
            return self.head.get_layer(name)

    @property
    def trainable_layers(self):
        return [layer for layer in self.layers if layer.trainable]

    def count_trainable_params(self):
        """Parameters the optimizer changes (batch-norm moving statistics are not among them)."""
        return sum(layer.count_params(trainable=True) for layer in self.layers)

    def frozen_features(self, images):
        """The frozen part's output for images (N, H, W, 3), computed under no_grad in inference
        mode; the images themselves when nothing is frozen.

        With ``fast`` (the default) it comes from the inference engine kept for the base, which
        agrees with the layers to float32 rounding and is quicker on the CPU (and folds the
        weights again if they change).
        """
        if self.frozen_output is None:
            return images
        if not self.fast:
            with no_grad():
                return self.base.forward(images, training=False, stop_after=self.frozen_output)
        return inference_engine(self.base)(images, stop_after=self.frozen_output)

    def forward(self, x, training=False):
        """Logits (N, 1) from the frozen part's output x. ``training=True``: dropout on and, with
        bn_statistics='batch', trainable batch-norm layers use batch statistics and move their
        moving statistics."""
        base_training = training and self.bn_statistics == 'batch'    # only batch-norm reads it in the base
        pooled = self.base_runner.forward(x, training=base_training, start_after=self.frozen_output)
        return self.head.forward(pooled, training=training)

    __call__ = forward

    def backward(self, dlogits, stop_at=None):
        """Backpropagate d(loss)/d(logits) (N, 1) through the head and the trainable layers of the
        base, filling their ``grads``; stops at the first trainable layer, below which nothing
        needs a gradient. Returns the gradient of that layer's input."""
        dpooled = self.head.backward(dlogits)
        return self.base_runner.backward(dpooled, stop_at=stop_at or self.first_trainable)


class FrozenFeatureFeed:
    """Photos turned into the fine-tuning model's input batch by batch, augmented afresh each time.

    ``feed[indices]`` takes those photos (uint8 (N, H, W, 3)), augments each with its own draw
    from ``rng``, scales them to [-1, 1] and runs the frozen part on them: the rows
    ``workflows.fit`` asks for. Without ``rng`` nothing is augmented, and then computing
    ``cache_frozen_features`` once is cheaper than a feed.
    """

    def __init__(self, network, pixels, rng=None, settings=AugmentSettings()):
        self.network, self.pixels = network, pixels
        self.rng, self.settings = rng, settings

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, indices):
        pixels = self.pixels[indices]
        if self.rng is not None:
            pixels = augment_batch(pixels, self.rng, self.settings)
        return self.network.frozen_features(backend.to_device(preprocess_input(pixels), np.float32))


def cache_frozen_features(network, pixels, batch_size=32, log=None):
    """The frozen part's output for every photo, once (no augmentation), as one host array.

    pixels: uint8 (N, H, W, 3). Returns float32 (N, ...) on the host, e.g. (N, 10, 10, 1024)
    when training from block14 at 299 px (400 KB a photo).
    """
    rows, started = [], time.monotonic()
    for start in range(0, len(pixels), batch_size):
        batch = backend.to_device(preprocess_input(pixels[start:start + batch_size]), np.float32)
        rows.append(backend.asnumpy(network.frozen_features(batch)))
        done = min(start + batch_size, len(pixels))
        if log is not None and (done == len(pixels) or (start // batch_size + 1) % 10 == 0):
            log(f'  {done}/{len(pixels)} photos  {done / max(time.monotonic() - started, 1e-9):.1f} photos/s')
    if not rows:
        shape = (network.base.input_shape if network.frozen_output is None
                 else network.base.output_shape(network.frozen_output)[1:])
        return np.zeros((0,) + tuple(shape), np.float32)
    return np.concatenate(rows)
