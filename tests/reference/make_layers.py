"""TensorFlow references for the layers, the dense head, the losses and the optimizers.

    python tests/reference/generate.py layers        # rewrites layers_*.npz beside this file

Every case draws its inputs, weights and upstream gradient with NumPy from a
seed derived from the case's name, runs the Keras equivalent on the CPU in
float32, and stores inputs and results, grouped by family, in
``layers_<family>.npz`` under the keys ``<case>/input/<name>`` and
``<case>/output/<name>``.

The tests read the same case list from here and compare minixcept with

* the stored results, always: ``expected('conv2d/3x3_s2_same_odd')``, and
* a fresh Keras run on the stored inputs when TensorFlow is installed:
  ``expected('conv2d/3x3_s2_same_odd', live=True)``.

Gradients are those of the scalar <output, dy> for a random dy, taken with
tf.GradientTape, so one backward pass checks every input and weight gradient.

This module never imports minixcept: a reference must not come from the code it
checks. TensorFlow is imported only inside the functions that run it, so the
tests can read the cases and the stored files without it.
"""
import functools
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- the cases ---------------------------------------------------------------------------

@dataclass
class LayerCase:
    """One layer on one input.

    layer: the class name in minixcept.layers, and in keras.layers unless ``keras`` says otherwise.
    args: constructor arguments, the same for both libraries.
    input_shape: Keras layout; Add takes two inputs of this shape.
    values: 'normal' (standard normal), 'negative' (every value below -0.5, so a zero pad
        would win every max it touches), 'ties' (three values only: many equal maxima),
        'zeros' (normal, with every third value exactly 0: ReLU's kink).
    """
    layer: str
    args: dict
    input_shape: tuple
    training: bool = False
    values: str = 'normal'
    keras: tuple = None            # (keras.layers class, extra args) where Keras names it otherwise
    inputs: tuple = ('x',)


def _stride2_same(layer, shape, **args):
    return LayerCase(layer, dict(args, strides=2, padding='same'), shape)


LAYER_CASES = {
    'conv2d': {
        '3x3_valid': LayerCase('Conv2D', dict(filters=4, kernel_size=3), (2, 6, 7, 3)),
        '3x3_s2_valid': LayerCase('Conv2D', dict(filters=4, kernel_size=3, strides=2), (2, 8, 9, 3)),
        '3x3_same': LayerCase('Conv2D', dict(filters=4, kernel_size=3, padding='same'), (2, 5, 5, 3)),
        # stride 2 'same': 7 pads (1, 1) but 8 pads (0, 1), TensorFlow's asymmetric case
        '3x3_s2_same_odd': _stride2_same('Conv2D', (2, 7, 7, 3), filters=4, kernel_size=3),
        '3x3_s2_same_even': _stride2_same('Conv2D', (2, 8, 8, 3), filters=4, kernel_size=3),
        '2x2_s2_same_odd': _stride2_same('Conv2D', (2, 7, 7, 3), filters=4, kernel_size=2),
        # Xception's residual shortcuts: 1x1, stride 2, 'same', no bias
        '1x1_s2_same_odd': _stride2_same('Conv2D', (2, 7, 7, 3), filters=4, kernel_size=1, use_bias=False),
        '1x1_s2_same_even': _stride2_same('Conv2D', (2, 8, 8, 3), filters=4, kernel_size=1, use_bias=False),
    },
    'depthwise': {
        '3x3_valid': LayerCase('DepthwiseConv2D', dict(kernel_size=3), (2, 6, 7, 3)),
        '3x3_same': LayerCase('DepthwiseConv2D', dict(kernel_size=3, padding='same', use_bias=False),
                              (2, 5, 5, 3)),
        '3x3_s2_same_odd': _stride2_same('DepthwiseConv2D', (2, 7, 7, 3), kernel_size=3),
        '3x3_s2_same_even': _stride2_same('DepthwiseConv2D', (2, 8, 8, 3), kernel_size=3),
    },
    'pointwise': {
        'no_bias': LayerCase('PointwiseConv2D', dict(filters=5, use_bias=False), (2, 4, 4, 3),
                             keras=('Conv2D', dict(kernel_size=1))),
        'bias': LayerCase('PointwiseConv2D', dict(filters=5, use_bias=True), (2, 4, 4, 3),
                          keras=('Conv2D', dict(kernel_size=1))),
    },
    'separable': {
        # Xception's own: 3x3, 'same', no bias (batch-norm follows)
        '3x3_same': LayerCase('SeparableConv2D', dict(filters=5, kernel_size=3, padding='same',
                                                      use_bias=False), (2, 5, 5, 3)),
        '3x3_valid_bias': LayerCase('SeparableConv2D', dict(filters=5, kernel_size=3), (2, 6, 6, 3)),
        '3x3_s2_same_even': _stride2_same('SeparableConv2D', (2, 8, 8, 3), filters=5, kernel_size=3),
    },
    'batchnorm': {
        'inference': LayerCase('BatchNormalization', {}, (2, 4, 4, 3)),
        'training': LayerCase('BatchNormalization', {}, (2, 4, 4, 3), training=True),
        'training_2d': LayerCase('BatchNormalization', {}, (8, 5), training=True),
        # frozen, as when fine-tuning: Keras runs it in inference mode even when training
        'frozen_training': LayerCase('BatchNormalization', dict(trainable=False), (2, 4, 4, 3), training=True),
    },
    'activation': {
        'relu_layer': LayerCase('ReLU', {}, (2, 4, 4, 3)),
        'relu': LayerCase('Activation', dict(activation='relu'), (2, 4, 4, 3)),
        'relu_at_zero': LayerCase('ReLU', {}, (2, 4, 4, 3), values='zeros'),   # TensorFlow's slope there is 0
        'sigmoid': LayerCase('Activation', dict(activation='sigmoid'), (4, 5)),
        'softmax': LayerCase('Activation', dict(activation='softmax'), (4, 5)),
    },
    'pooling': {
        # Xception's pools: 3x3, stride 2, 'same'. Negative inputs: zero padding would be wrong.
        'max_3x3_s2_same_odd': LayerCase('MaxPooling2D', dict(pool_size=3, strides=2, padding='same'),
                                         (2, 7, 7, 3), values='negative'),
        'max_3x3_s2_same_even': LayerCase('MaxPooling2D', dict(pool_size=3, strides=2, padding='same'),
                                          (2, 8, 8, 3), values='negative'),
        'max_2x2_same_odd': LayerCase('MaxPooling2D', dict(pool_size=2, padding='same'),
                                      (2, 7, 7, 3), values='negative'),
        'max_2x2_valid': LayerCase('MaxPooling2D', dict(pool_size=2), (2, 6, 7, 3)),
        'max_3x3_s2_same_ties': LayerCase('MaxPooling2D', dict(pool_size=3, strides=2, padding='same'),
                                          (2, 8, 8, 3), values='ties'),
        'global_average': LayerCase('GlobalAveragePooling2D', {}, (2, 4, 5, 3)),
        'global_max': LayerCase('GlobalMaxPooling2D', {}, (2, 4, 5, 3)),
        'global_max_ties': LayerCase('GlobalMaxPooling2D', {}, (2, 4, 5, 3), values='ties'),
    },
    'merge': {
        'add': LayerCase('Add', {}, (2, 4, 4, 3), inputs=('a', 'b')),
    },
    'dense': {
        'linear': LayerCase('Dense', dict(units=5), (4, 6)),
        'no_bias': LayerCase('Dense', dict(units=5, use_bias=False), (4, 6)),
        'relu': LayerCase('Dense', dict(units=5, activation='relu'), (4, 6)),
        'sigmoid': LayerCase('Dense', dict(units=5, activation='sigmoid'), (4, 6)),
        'softmax': LayerCase('Dense', dict(units=5, activation='softmax'), (4, 6)),
        'dropout_inference': LayerCase('Dropout', dict(rate=0.5), (4, 6)),
        # Keras draws the mask (seeded, so the file is reproducible) and the result keeps it
        # as 'keep': the libraries' generators differ, so minixcept replays Keras's mask
        'dropout_training': LayerCase('Dropout', dict(rate=0.5, seed=7), (4, 6), training=True),
    },
}


@dataclass
class HeadCase:
    """Dense(256) -> ReLU -> Dropout(0.5) -> Dense(classes, activation), and its loss.

    classes 1 uses BinaryCrossentropy, more uses SparseCategoricalCrossentropy;
    activation None means the loss takes logits (from_logits=True).
    """
    classes: int
    activation: str = None
    training: bool = False
    features: int = 16
    batch: int = 8
    hidden: int = 256
    rate: float = 0.5

    @property
    def from_logits(self):
        return self.activation is None


HEAD_CASES = {
    f'{loss}_{output}_{mode}': HeadCase(classes, activation, training)
    for loss, classes, probability in (('binary', 1, 'sigmoid'), ('sparse', 3, 'softmax'))
    for output, activation in (('logits', None), (probability, probability))
    for mode, training in (('inference', False), ('training', True))
}


@dataclass
class LossCase:
    """A loss on hand-picked predictions. ``kind`` is 'binary' or 'sparse'."""
    kind: str
    from_logits: bool
    predictions: str               # 'typical' or 'extreme' (clip boundaries, huge logits)


LOSS_CASES = {
    f'{kind}_{source}_{predictions}': LossCase(kind, source == 'logits', predictions)
    for kind in ('binary', 'sparse')
    for source in ('logits', 'probabilities')
    for predictions in ('typical', 'extreme')
}


@dataclass
class OptimizerCase:
    """A few steps of a Keras optimizer on a (4, 3) kernel and a (3,) bias, new gradients each step."""
    optimizer: str
    args: dict = field(default_factory=dict)
    steps: int = 3


OPTIMIZER_CASES = {
    'sgd_momentum': OptimizerCase('SGD', dict(learning_rate=0.1, momentum=0.9)),
    'sgd_nesterov': OptimizerCase('SGD', dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
    'sgd_plain': OptimizerCase('SGD', dict(learning_rate=0.1), steps=1),
    'adam': OptimizerCase('Adam', dict(learning_rate=0.01), steps=4),
    'adam_custom': OptimizerCase('Adam', dict(learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-4),
                                 steps=4),
}

FAMILIES = {**{family: ('layer', cases) for family, cases in LAYER_CASES.items()},
            'head': ('head', HEAD_CASES),
            'losses': ('loss', LOSS_CASES),
            'optimizers': ('optimizer', OPTIMIZER_CASES)}


def case_ids(*families):
    """'family/case' for every case of the given families (all of them when none given)."""
    return [f'{family}/{name}' for family in (families or FAMILIES) for name in FAMILIES[family][1]]


def case(case_id):
    family, name = case_id.split('/')
    return FAMILIES[family][1][name]


# -- drawing inputs (NumPy only) ---------------------------------------------------------

def _rng(case_id):
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def _values(rng, shape, style):
    if style == 'negative':
        return -(0.5 + np.abs(rng.standard_normal(shape)))
    if style == 'ties':
        return rng.integers(-2, 1, size=shape) + 0.5
    if style == 'zeros':
        return np.where(np.arange(np.prod(shape)).reshape(shape) % 3 == 0, 0.0, rng.standard_normal(shape))
    return rng.standard_normal(shape)


def _weight(rng, name, shape):
    """A random value for a Keras weight, positive where it must be."""
    if name in ('gamma', 'moving_variance'):
        return rng.uniform(0.5, 1.5, shape)
    if name in ('bias', 'beta', 'moving_mean'):
        return 0.3 * rng.standard_normal(shape)
    return 0.5 * rng.standard_normal(shape)          # every kind of kernel


def _float32(arrays):
    return {name: np.asarray(a, np.float32) if np.asarray(a).dtype.kind == 'f' else np.asarray(a)
            for name, a in arrays.items()}


# -- running Keras -----------------------------------------------------------------------

def _keras_layer(layer_case):
    import keras
    name, extra = layer_case.keras or (layer_case.layer, {})
    return getattr(keras.layers, name)(**layer_case.args, **extra)


def _build(layer, layer_case):
    shape = layer_case.input_shape
    layer.build([shape, shape] if len(layer_case.inputs) == 2 else shape)


def draw_layer(case_id, layer_case):
    rng = _rng(case_id)
    inputs = {name: _values(rng, layer_case.input_shape, layer_case.values) for name in layer_case.inputs}
    if layer_case.layer == 'BatchNormalization':
        inputs['x'] = 1.5 * inputs['x'] + 0.5               # batch statistics unlike the moving ones
    layer = _keras_layer(layer_case)
    _build(layer, layer_case)
    for i, weight in enumerate(layer.weights):               # Keras order: w0, w1, ...
        inputs[f'w{i}'] = _weight(rng, weight.name, tuple(weight.shape))
    shapes = [layer_case.input_shape] * len(layer_case.inputs)
    out_shape = layer.compute_output_shape(shapes if len(shapes) == 2 else shapes[0])
    inputs['dy'] = rng.standard_normal(out_shape)
    return _float32(inputs)


def run_layer(layer_case, inputs):
    """Keras forward and gradients of <y, dy>: y, dx (or da, db), dw<i> for each trainable w<i>;
    after a training step also the moving statistics, and the dropout mask as 'keep'."""
    import tensorflow as tf
    layer = _keras_layer(layer_case)
    _build(layer, layer_case)
    layer.set_weights([inputs[f'w{i}'] for i in range(len(layer.weights))])
    xs = [tf.constant(inputs[name]) for name in layer_case.inputs]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y = layer(xs if len(xs) == 2 else xs[0], training=layer_case.training)
        objective = tf.reduce_sum(y * inputs['dy'])
    trainable = [i for i, w in enumerate(layer.weights) if w.trainable]
    grads = tape.gradient(objective, xs + [layer.weights[i] for i in trainable])
    outputs = {'y': y.numpy()}
    for name, grad in zip(layer_case.inputs, grads):
        outputs[f'd{name}'] = grad.numpy()
    for i, grad in zip(trainable, grads[len(xs):]):
        outputs[f'dw{i}'] = grad.numpy()
    if layer_case.layer == 'BatchNormalization' and layer_case.training:
        outputs['moving_mean'] = layer.moving_mean.numpy()
        outputs['moving_variance'] = layer.moving_variance.numpy()
    if layer_case.layer == 'Dropout' and layer_case.training:
        outputs['keep'] = outputs['y'] != 0                  # inputs are never exactly 0
    return outputs


def draw_head(case_id, head):
    rng = _rng(case_id)
    labels = rng.integers(0, max(head.classes, 2), size=head.batch)
    return _float32({
        'x': rng.standard_normal((head.batch, head.features)),
        'labels': labels.reshape(-1, 1).astype(np.float32) if head.classes == 1 else labels,
        'w0': 0.25 * rng.standard_normal((head.features, head.hidden)),
        'w1': 0.1 * rng.standard_normal(head.hidden),
        'w2': 0.1 * rng.standard_normal((head.hidden, head.classes)),
        'w3': 0.1 * rng.standard_normal(head.classes),
    })


def run_head(head, inputs):
    """Loss and gradients of the four head weights (w0..w3) under tf.GradientTape.

    The layers are called one by one (exactly what keras.Sequential does) so the dropout
    mask Keras draws can be read off and stored as 'keep': minixcept replays it.
    """
    import keras
    import tensorflow as tf
    hidden = keras.layers.Dense(head.hidden)
    relu = keras.layers.ReLU()
    dropout = keras.layers.Dropout(head.rate, seed=7)
    output = keras.layers.Dense(head.classes, activation=head.activation)
    hidden.build((None, head.features))
    output.build((None, head.hidden))
    hidden.set_weights([inputs['w0'], inputs['w1']])
    output.set_weights([inputs['w2'], inputs['w3']])
    loss_class = keras.losses.BinaryCrossentropy if head.classes == 1 else keras.losses.SparseCategoricalCrossentropy
    loss_fn = loss_class(from_logits=head.from_logits)
    weights = hidden.weights + output.weights
    with tf.GradientTape() as tape:
        activations = relu(hidden(inputs['x']))
        dropped = dropout(activations, training=head.training)
        loss = loss_fn(inputs['labels'], output(dropped))
    grads = tape.gradient(loss, weights)
    # Where the ReLU output is 0 the mask cannot be read off, and does not matter either.
    outputs = {'loss': loss.numpy(), 'keep': dropped.numpy() != 0}
    outputs.update({f'dw{i}': grad.numpy() for i, grad in enumerate(grads)})
    return outputs


EPSILON = 1e-7          # Keras's backend epsilon: probabilities are clipped to [EPSILON, 1 - EPSILON]


def draw_loss(case_id, loss_case):
    rng = _rng(case_id)
    f32 = np.float32
    if loss_case.kind == 'binary':
        if loss_case.predictions == 'typical':
            pred = 2 * rng.standard_normal(10) if loss_case.from_logits else rng.uniform(0.02, 0.98, 10)
            labels = rng.integers(0, 2, 10)
        else:
            if loss_case.from_logits:
                edge = [-100, -30, -17, 0, 17, 30, 100]
            else:   # exactly at the clip, just inside, just outside and beyond it, on both sides
                edge = [0, 1e-9, f32(EPSILON), 2e-7, 0.5, f32(1 - 2e-7), f32(1 - EPSILON), 1 - 1e-9, 1]
            pred = np.repeat(np.asarray(edge, np.float64), 2)
            labels = np.tile([0, 1], len(edge))
        return _float32({'pred': pred.reshape(-1, 1), 'labels': labels.reshape(-1, 1).astype(f32)})
    if loss_case.predictions == 'typical':
        logits = 1.5 * rng.standard_normal((6, 4))
        pred = logits if loss_case.from_logits else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    elif loss_case.from_logits:
        pred = np.array([[100, 0, -100, 3], [-50, 50, 0, 0], [30, 30, 30, 30],
                         [0, 0, 0, 89], [-89, 0, 1, 2], [5, -5, 0, 200]])
    else:   # entries at, inside and outside the clip; some rows do not sum to 1
        pred = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [f32(EPSILON), f32(1 - EPSILON), 0, 0],
                         [2e-7, 0.5, 0.5, 1e-9], [0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 1e-8, 0.3]])
    labels = np.array([0, 2, 1, 0, 3, 2]) if loss_case.predictions == 'extreme' else rng.integers(0, 4, 6)
    return _float32({'pred': np.asarray(pred, np.float64), 'labels': labels})


def run_loss(loss_case, inputs):
    """The Keras loss: 'loss' (mean over the batch) and 'dpred' (its gradient), and per example
    'losses' and 'dpreds' (the gradient of the summed losses: each row sees only its own)."""
    import keras
    import tensorflow as tf
    loss_class = (keras.losses.BinaryCrossentropy if loss_case.kind == 'binary'
                  else keras.losses.SparseCategoricalCrossentropy)
    pred = tf.constant(inputs['pred'])
    outputs = {}
    for reduction, loss_name, grad_name in (('sum_over_batch_size', 'loss', 'dpred'), ('none', 'losses', 'dpreds')):
        loss_fn = loss_class(from_logits=loss_case.from_logits, reduction=reduction)
        with tf.GradientTape() as tape:
            tape.watch(pred)
            loss = loss_fn(inputs['labels'], pred)
            total = tf.reduce_sum(loss)
        outputs[loss_name] = loss.numpy()
        outputs[grad_name] = tape.gradient(total, pred).numpy()
    return outputs


def draw_optimizer(case_id, optimizer_case):
    rng = _rng(case_id)
    inputs = {'w0': 0.5 * rng.standard_normal((4, 3)), 'w1': 0.5 * rng.standard_normal(3)}
    for step in range(optimizer_case.steps):
        inputs[f'g0_step{step}'] = rng.standard_normal((4, 3))
        inputs[f'g1_step{step}'] = rng.standard_normal(3)
    return _float32(inputs)


def run_optimizer(optimizer_case, inputs):
    """The two weights after each step: 'w0_step<t>', 'w1_step<t>'."""
    import keras
    variables = [keras.Variable(inputs['w0']), keras.Variable(inputs['w1'])]
    optimizer = getattr(keras.optimizers, optimizer_case.optimizer)(**optimizer_case.args)
    outputs = {}
    for step in range(optimizer_case.steps):
        grads = [inputs[f'g0_step{step}'], inputs[f'g1_step{step}']]
        optimizer.apply_gradients(zip(grads, variables))
        for i, variable in enumerate(variables):
            outputs[f'w{i}_step{step}'] = variable.numpy()
    return outputs


DRAW = {'layer': draw_layer, 'head': draw_head, 'loss': draw_loss, 'optimizer': draw_optimizer}
RUN = {'layer': run_layer, 'head': run_head, 'loss': run_loss, 'optimizer': run_optimizer}


# -- the files ---------------------------------------------------------------------------

def fixture_path(family, out_dir=HERE):
    return Path(out_dir) / f'layers_{family}.npz'


def make(out_dir):
    """Draw every case, run Keras on it, and write one layers_<family>.npz per family."""
    for family, (kind, cases) in FAMILIES.items():
        arrays = {}
        for name, spec in cases.items():
            inputs = DRAW[kind](f'{family}/{name}', spec)
            outputs = _float32(RUN[kind](spec, inputs))
            arrays.update({f'{name}/input/{key}': value for key, value in inputs.items()})
            arrays.update({f'{name}/output/{key}': value for key, value in outputs.items()})
        np.savez_compressed(fixture_path(family, out_dir), **arrays)


@functools.lru_cache(maxsize=None)
def _stored(family):
    path = fixture_path(family)
    if not path.exists():
        raise FileNotFoundError(f'{path.name} is missing: run python tests/reference/generate.py layers')
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _part(case_id, part):
    family, name = case_id.split('/')
    prefix = f'{name}/{part}/'
    found = {key[len(prefix):]: value for key, value in _stored(family).items() if key.startswith(prefix)}
    if not found:
        raise KeyError(f'layers_{family}.npz has no case {name!r}: regenerate the fixtures')
    return found


@functools.lru_cache(maxsize=None)
def _live(case_id):
    family, _ = case_id.split('/')
    return _float32(RUN[FAMILIES[family][0]](case(case_id), _part(case_id, 'input')))


def expected(case_id, live=False):
    """(inputs, outputs) of a case: inputs as stored; outputs as stored, or computed by Keras
    now on those same inputs when ``live``. Shared between tests: never modify them."""
    return _part(case_id, 'input'), (_live(case_id) if live else _part(case_id, 'output'))
