"""TensorFlow references for minixcept.workflows.explain and examples/separable_cost.py.

    python tests/reference/generate.py explain

Writes, beside this script (every number from Keras on the CPU):

    explain_gradcam.npz   a cat and a dog at 128 x 128 through Xception (real ImageNet
                          notop weights, float64) and a small head with random weights
                          (Dense(256, relu) -> Dropout -> Dense(1) on the average-pooled
                          features; ``head_weights`` rebuilds them): the class of each photo, the Grad-CAM
                          maps at GRADCAM_LAYERS (GradientTape watching Keras's own tensor
                          for each), a slice of each activation gradient, a sample of the
                          plain input gradient and of the SmoothGrad average
    explain_costs.npz     count_params() and output shapes of Keras's own layers for the
                          ways of going from 16 to 32 channels with a 3x3 window (COST_CASE),
                          and count_params() of the network variants of separable_cost.py

float64 for the same reason as make_network.py: the input gradient goes through every
ReLU of the network, and in float32 a pre-activation within rounding of zero may fall on
either side of the kink.

Nothing here imports minixcept: a reference must never come from the code it checks. The
helpers above ``make`` are shared with the live tests (tests/test_explain.py).
"""
from pathlib import Path

import numpy as np

import make_network as network

SIDE = 128                 # block14 is 4 x 4, the middle flow 8 x 8
# The last activation (Keras's own Grad-CAM example uses it), a middle-flow block output
# that two layers read (block 9's first ReLU and its residual add: its gradient is the sum
# of both), and an activation inside the middle flow that only one layer reads.
GRADCAM_LAYERS = ('block14_sepconv2_act', 'add_6', 'block8_sepconv3_act')
HEAD_UNITS, HEAD_SEED = 256, 15     # the head's hidden width, its weights' seed
SMOOTHGRAD = dict(samples=3, noise=0.15, seed=0)
GRADIENT_SAMPLE = np.s_[:, ::4, ::4, :]           # of an input gradient (2, 128, 128, 3)
CHANNEL_SAMPLE = np.s_[..., :32]                  # of an activation gradient

COST_CASE = dict(c_in=16, c_out=32, kernel=3)
COST_SIZE = 8                                     # M: the 1x1 layers must keep M x M
# examples/separable_cost.py's network variants, without the top: keyword arguments of
# make_network.keras_xception_blocks
NETWORK_VARIANTS = {'built': {}, 'full': dict(separable=False), 'deeper': dict(middle_blocks=16),
                    'wider': dict(middle_width=1024)}


# -- shared with the live tests -------------------------------------------------------
def head_weights(feature_dim, seed=HEAD_SEED):
    """Weights for the head (Keras order: kernel, bias, kernel, bias), Glorot-uniform from
    NumPy's generator so that tests rebuild them exactly without storing 2 MB; rounded to
    float32 so that a head saved as float32 HDF5 holds exactly these numbers."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in ((feature_dim, HEAD_UNITS), (HEAD_UNITS, 1)):
        limit = np.sqrt(6 / (fan_in + fan_out))
        weights += [rng.uniform(-limit, limit, (fan_in, fan_out)), rng.uniform(-0.1, 0.1, fan_out)]
    return [w.astype(np.float32).astype(np.float64) for w in weights]


def keras_head(weights, dtype='float64'):
    """examples/catdog_bottleneck.py's head in Keras: Dense(256, relu) -> Dropout -> Dense(1)."""
    import keras
    head = keras.Sequential([keras.Input((weights[0].shape[0],), dtype=dtype),
                             keras.layers.Dense(HEAD_UNITS, activation='relu', dtype=dtype),
                             keras.layers.Dropout(0.5, dtype=dtype), keras.layers.Dense(1, dtype=dtype)])
    head.set_weights(weights)
    return head


def noisy_copies(x, samples, noise, seed):
    """SmoothGrad's copies: x + N(0, (noise * (max - min of each image))^2), one batch per
    draw of numpy.random.default_rng(seed) (the recipe minixcept.workflows.explain documents)."""
    rng = np.random.default_rng(seed)
    spread = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    return [x + noise * spread * rng.standard_normal(x.shape).astype(x.dtype) for _ in range(samples)]


def keras_explanations(base, head, x, layers, classes=None):
    """GradientTape through Keras: the class score s (z for class 1, -z for class 0), its
    gradient at each named layer's output and at the input, and each Grad-CAM map.

    Returns (classes, {layer: (activation, gradient, cam)}, input gradient).
    """
    import keras
    import tensorflow as tf
    probe = keras.Model(base.inputs, [network.keras_layer(base, name).output for name in layers] + [base.output])
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = probe(x, training=False)
        *activations, output = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        logits = head(tf.reduce_mean(output, axis=(1, 2)), training=False)
        if classes is None:
            classes = (np.asarray(logits)[:, 0] > 0).astype(np.int64)
        sign = tf.constant(np.where(classes == 1, 1.0, -1.0), dtype=logits.dtype)
        score = tf.reduce_sum(logits[:, 0] * sign)
    *gradients, dx = tape.gradient(score, activations + [x])
    results = {}
    for name, a, g in zip(layers, activations, gradients):
        alpha = tf.reduce_mean(g, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(alpha * a, axis=3))
        results[name] = (np.asarray(a), np.asarray(g), np.asarray(cam))
    return classes, results, np.asarray(dx)


def keras_smoothgrad(base, head, x, classes, samples, noise, seed):
    """The input gradient of the class score averaged over the noisy copies."""
    gradients = [keras_explanations(base, head, copy, (), classes)[2]
                 for copy in noisy_copies(x, samples, noise, seed)]
    return np.mean(gradients, axis=0)


def keras_cost_layers(c_in, c_out, kernel):
    """{row: Keras layers in order} for going from c_in to c_out channels with a
    kernel x kernel window, none with a bias."""
    from keras import layers
    n = kernel
    return {
        'full': [layers.Conv2D(c_out, n, padding='same', use_bias=False)],
        'factorised': [layers.Conv2D(c_in, (1, n), padding='same', use_bias=False),
                       layers.Conv2D(c_out, (n, 1), padding='same', use_bias=False)],
        'pointwise_depthwise': [layers.Conv2D(c_out, 1, use_bias=False),
                                layers.DepthwiseConv2D(n, padding='same', use_bias=False)],
        'depthwise_pointwise': [layers.SeparableConv2D(c_out, n, padding='same', use_bias=False)],
        'factorised_depthwise': [layers.DepthwiseConv2D((1, n), padding='same', use_bias=False),
                                 layers.DepthwiseConv2D((n, 1), padding='same', use_bias=False),
                                 layers.Conv2D(c_out, 1, use_bias=False)],
    }


def keras_cost_counts(c_in, c_out, kernel, size=COST_SIZE):
    """{row: (total count_params(), output shape)} of keras_cost_layers, each stack built on
    (size, size, c_in)."""
    import keras
    counts = {}
    for row, stack in keras_cost_layers(c_in, c_out, kernel).items():
        model = keras.Sequential([keras.Input((size, size, c_in))] + stack)
        counts[row] = (model.count_params(), tuple(model.compute_output_shape((1, size, size, c_in))[1:]))
    return counts


def keras_network_counts():
    """{variant: count_params()} of NETWORK_VARIANTS, built by Keras without the top."""
    counts = {}
    for variant, changes in NETWORK_VARIANTS.items():
        arguments = {'middle_blocks': 8, **changes}
        counts[variant] = network.keras_xception_blocks((71, 71, 3), **arguments).count_params()
    return counts


# -- the fixtures ------------------------------------------------------------------
def make_gradcam(out_dir):
    import keras
    images = network.load_photos(network.CATDOG, SIDE)
    x = keras.applications.xception.preprocess_input(images.astype(np.float32)).astype(np.float64)
    base = network.keras_xception((SIDE, SIDE, 3), network.NOTOP_WEIGHTS, dtype='float64')
    head = keras_head(head_weights(base.output.shape[-1]))
    classes, results, dx = keras_explanations(base, head, x, GRADCAM_LAYERS)
    smooth = keras_smoothgrad(base, head, x, classes, **SMOOTHGRAD)
    arrays = {'images': images, 'classes': classes, 'input_gradient': dx[GRADIENT_SAMPLE],
              'smoothgrad': smooth[GRADIENT_SAMPLE]}
    for name, (activation, gradient, cam) in results.items():
        arrays[f'cam/{name}'] = cam
        arrays[f'gradient/{name}'] = gradient[CHANNEL_SAMPLE]
    np.savez_compressed(Path(out_dir) / 'explain_gradcam.npz', **arrays)


def make_costs(out_dir):
    arrays = {}
    for row, (count, shape) in keras_cost_counts(**COST_CASE).items():
        arrays[f'weights/{row}'], arrays[f'shape/{row}'] = count, np.array(shape)
    for variant, count in keras_network_counts().items():
        arrays[f'network/{variant}'] = count
    np.savez_compressed(Path(out_dir) / 'explain_costs.npz', **arrays)


def make(out_dir):
    if not network.NOTOP_WEIGHTS.exists():
        raise SystemExit(f'{network.NOTOP_WEIGHTS.name} is missing: run python weights/fetch.py first')
    make_costs(out_dir)
    make_gradcam(out_dir)
