"""TensorFlow references for the whole network: Xception with the real ImageNet weights.

    python tests/reference/generate.py network

Writes, beside this script (every number comes from Keras running on the CPU):

    network_forward.npz             one photo at 299 x 299 through the notop model: for each
                                    of the 131 named layers its mean, standard deviation,
                                    max |a| and a fixed corner slice, plus the 2048
                                    average-pooled features
    network_backward_inference.npz  2 x 96 x 96 x 3 photos backpropagated in float64 from a
                                    random gradient on block14_sepconv2_act, batch-norm in
                                    inference mode: the output, a sample of the input gradient
                                    and the gradients of weights from every flow
    network_backward_training.npz   the same with batch statistics (Keras's training=True),
                                    plus the moving statistics of three batch-norms afterwards
    network_counts.npz              parameter counts (top, notop, a 12-block middle flow) and
                                    multiply-adds at 299 px, from Keras's own layers

Why float64 for the backward pass: in float32 a pre-ReLU value within rounding of zero
can land on the other side of the kink in one implementation, and a batch of 2 x 96 x 96
sends about three million values through ReLUs. With these photos one does (an input of
block10_sepconv3_act: +3.0e-6 in minixcept, -2.4e-7 in Keras, against a largest value of
5.7), and the gradients below it then differ by up to 2e-2 (1e-1 with batch statistics):
a property of ReLU in float32, not of either code. In float64 the two forward passes
agree to 1e-14, every branch is the same, and the gradients agree to 4e-14.

The helpers above ``make`` are shared with the live tests (tests/test_xception_tf.py)
so that the fixture and the live comparison feed Keras exactly the same way. Nothing
here imports minixcept: a reference must never come from the code it checks.
"""
import re
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
NOTOP_WEIGHTS = HERE.parents[1] / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'
CATDOG = HERE.parents[2] / 'shared' / 'catdog'

# One cat and one dog from the validation split (both larger than 299 px, both RGB JPEGs).
PHOTOS = ('validation/cats/cat.0.jpg', 'validation/dogs/dog.0.jpg')
FULL_SIDE = 299                       # Xception's ImageNet input
SMALL_SIDE = 96                       # for the backward pass: block14 is then 3 x 3
FORWARD_SLICE = np.s_[0, :2, :2, :8]  # the corner of every activation that the fixture keeps
UPSTREAM_SEED = 2017

# Weights whose gradients are compared: some from every flow. The fixture keeps a corner
# of the big kernels (``where``); the live test compares every weight whole.
_CORNER = np.s_[:, :, :32, :32]           # of a depthwise (3, 3, C, 1) kernel: 32 channels
GRADIENT_SAMPLES = (
    ('block1_conv1', 'kernel', np.s_[...]),
    ('block1_conv1_bn', 'gamma', np.s_[...]),
    ('block2_sepconv1', 'depthwise_kernel', np.s_[...]),
    ('block2_sepconv1', 'pointwise_kernel', _CORNER),
    ('conv2d', 'kernel', _CORNER),                            # block 2's shortcut
    ('batch_normalization', 'gamma', np.s_[...]),
    ('batch_normalization', 'beta', np.s_[...]),
    ('block8_sepconv2', 'depthwise_kernel', _CORNER),         # middle flow
    ('block8_sepconv2', 'pointwise_kernel', _CORNER),
    ('block8_sepconv2_bn', 'gamma', np.s_[...]),
    ('block8_sepconv2_bn', 'beta', np.s_[...]),
    ('block13_sepconv2', 'depthwise_kernel', _CORNER),        # exit flow
    ('block13_sepconv2', 'pointwise_kernel', _CORNER),
    ('conv2d_3', 'kernel', _CORNER),                          # block 13's shortcut
    ('block14_sepconv2', 'depthwise_kernel', _CORNER),
    ('block14_sepconv2', 'pointwise_kernel', _CORNER),
    ('block14_sepconv2_bn', 'gamma', np.s_[...]),
    ('block14_sepconv2_bn', 'beta', np.s_[...]),
)
INPUT_GRADIENT_SAMPLE = np.s_[:, ::3, ::3, :]   # every third pixel of both examples
MOVING_STATISTICS_OF = ('block1_conv1_bn', 'batch_normalization', 'block14_sepconv2_bn')

_AUTOMATIC_NAME = re.compile(r'(conv2d|batch_normalization|add)(?:_\d+)?')


# -- inputs, the same for the fixture and the live tests -------------------------------
def load_photos(catdog_dir, side, photos=PHOTOS):
    """The photos as uint8 (N, height, width, 3), ``side`` being one number for both or
    (height, width): RGB, resized bilinearly by Pillow, as keras.utils.load_img(path,
    target_size=(height, width), interpolation='bilinear')."""
    height, width = (side, side) if np.isscalar(side) else side
    images = []
    for relative in photos:
        with Image.open(Path(catdog_dir) / relative) as photo:
            images.append(np.asarray(photo.convert('RGB').resize((width, height), Image.BILINEAR)))
    return np.stack(images)


def upstream_gradient(shape, seed=UPSTREAM_SEED):
    """A random gradient for the network's output, rounded to float16 so that the stored
    copy is small and still exactly what Keras was given."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float16).astype(np.float32)


# -- Keras side --------------------------------------------------------------------
def canonical_names(keras_model):
    """Names of the model's layers (input left out) as Keras 3 gives them in a fresh
    process: the unnamed residual layers numbered from this model's first one
    (conv2d, conv2d_1, ...), however many Keras layers the process made before."""
    counters, names = {}, []
    for layer in keras_model.layers[1:]:
        match = _AUTOMATIC_NAME.fullmatch(layer.name)
        if match:
            base = match.group(1)
            count = counters.get(base, 0)
            counters[base] = count + 1
            names.append(base if count == 0 else f'{base}_{count}')
        else:
            names.append(layer.name)
    return names


def keras_xception(input_shape, weights_path=None, include_top=False, classes=1000, dtype='float32'):
    """keras.applications.Xception with random weights, or the weights of a legacy HDF5 file
    loaded with Keras's own model.load_weights, computing in ``dtype``.

    For float64 both the dtype policy and floatx are switched while the model is built:
    the input layer follows floatx, and a float32 input layer would round the input
    gradient to float32.
    """
    import keras
    previous_policy, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy(dtype)
    keras.config.set_floatx(dtype)
    try:
        model = keras.applications.Xception(include_top=include_top, weights=None,
                                            input_shape=input_shape, classes=classes)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.config.set_floatx(previous_floatx)
    if weights_path is not None:
        model.load_weights(str(weights_path))
    return model


def keras_xception_blocks(input_shape, middle_blocks, include_top=False, classes=1000, middle_width=728,
                          separable=True):
    """Xception built layer by layer from Keras layers with a middle flow of any depth and
    width, and (separable=False) full convolutions in place of the separable ones.

    It follows keras.applications.Xception's graph (the tests check that it matches
    that model at 8 blocks of 728) so that Keras can count a variant's parameters.
    """
    import keras
    from keras import layers

    def sepconv_bn(x, filters):
        convolution = layers.SeparableConv2D if separable else layers.Conv2D
        x = convolution(filters, 3, padding='same', use_bias=False)(x)
        return layers.BatchNormalization(epsilon=1e-3)(x)

    def downsampling(x, filters, leading_relu=True):
        shortcut = layers.Conv2D(filters[1], 1, strides=2, padding='same', use_bias=False)(x)
        shortcut = layers.BatchNormalization(epsilon=1e-3)(shortcut)
        if leading_relu:
            x = layers.Activation('relu')(x)
        x = sepconv_bn(x, filters[0])
        x = layers.Activation('relu')(x)
        x = sepconv_bn(x, filters[1])
        x = layers.MaxPooling2D(3, strides=2, padding='same')(x)
        return layers.Add()([x, shortcut])

    inputs = keras.Input(input_shape)
    x = layers.Conv2D(32, 3, strides=2, use_bias=False)(inputs)
    x = layers.BatchNormalization(epsilon=1e-3)(x)
    x = layers.Activation('relu')(x)
    x = layers.Conv2D(64, 3, use_bias=False)(x)
    x = layers.BatchNormalization(epsilon=1e-3)(x)
    x = layers.Activation('relu')(x)
    x = downsampling(x, (128, 128), leading_relu=False)
    x = downsampling(x, (256, 256))
    x = downsampling(x, (middle_width, middle_width))
    for _ in range(middle_blocks):
        residual = x
        for _ in range(3):
            x = layers.Activation('relu')(x)
            x = sepconv_bn(x, middle_width)
        x = layers.Add()([x, residual])
    x = downsampling(x, (middle_width, 1024))
    x = sepconv_bn(x, 1536)
    x = layers.Activation('relu')(x)
    x = sepconv_bn(x, 2048)
    x = layers.Activation('relu')(x)
    if include_top:
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(classes, activation='softmax')(x)
    return keras.Model(inputs, x)


def keras_multiply_adds(keras_model):
    """Multiply-adds for one example, from each Keras layer's kernel and output shape:
    a convolution does kh * kw * C_in * C_out of them per output pixel, a separable one
    kh * kw * C_in (depthwise) + C_in * C_out (pointwise), a Dense layer in * out.
    Batch-norm, ReLU, pooling and adds are not counted (the usual convention)."""
    total = 0
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind in ('Conv2D', 'SeparableConv2D'):
            _, height, width, _ = layer.output.shape
            if kind == 'Conv2D':
                per_pixel = int(np.prod(layer.kernel.shape))
            else:
                kh, kw, c_in, _ = layer.depthwise_kernel.shape
                per_pixel = kh * kw * c_in + int(np.prod(layer.pointwise_kernel.shape))
            total += height * width * per_pixel
        elif kind == 'Dense':
            total += int(np.prod(layer.kernel.shape))
    return total


def keras_activations(keras_model, x):
    """Every layer's output for input x, as {canonical name: NumPy array}."""
    import keras
    outputs = [layer.output for layer in keras_model.layers[1:]]
    values = keras.Model(keras_model.inputs, outputs)(x, training=False)
    return {name: np.asarray(v) for name, v in zip(canonical_names(keras_model), values)}


def keras_gradients(keras_model, x, upstream, training):
    """Backpropagate ``upstream`` (the gradient of the model's output) with GradientTape.

    Returns the output, d(input) and {(layer name, weight name): gradient} for every
    trainable weight. With training=True batch-norm uses batch statistics and, as a side
    effect, moves its moving statistics, exactly as one training step in Keras.
    """
    import tensorflow as tf
    names = canonical_names(keras_model)
    variables, keys = [], []
    for name, layer in zip(names, keras_model.layers[1:]):
        for variable in layer.trainable_weights:
            variables.append(variable)
            keys.append((name, variable.name))
    x = tf.constant(x)
    upstream = tf.constant(upstream, dtype=x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = keras_model(x, training=training)
        objective = tf.reduce_sum(y * upstream)          # d objective / dy = upstream
    dx, *weight_grads = tape.gradient(objective, [x] + variables)
    return (np.asarray(y), np.asarray(dx),
            {key: np.asarray(g) for key, g in zip(keys, weight_grads)})


def keras_layer(keras_model, canonical):
    return keras_model.layers[1 + canonical_names(keras_model).index(canonical)]


# -- the fixtures ------------------------------------------------------------------
def forward_summary(keras_model, images):
    """One photo (1, H, W, 3) uint8 through a Keras model: for every named layer its mean,
    standard deviation, max |a| and corner slice, and the average-pooled block14 features."""
    import keras
    x = keras.applications.xception.preprocess_input(images.astype(np.float32))
    activations = keras_activations(keras_model, x)
    names = list(activations)
    values = [activations[name].astype(np.float64) for name in names]
    pooled = keras.layers.GlobalAveragePooling2D()(activations['block14_sepconv2_act'])
    return dict(image=images, names=np.array(names),
                mean=np.array([v.mean() for v in values]),
                std=np.array([v.std() for v in values]),
                max_abs=np.array([np.abs(v).max() for v in values]),
                corner=np.stack([activations[name][FORWARD_SLICE] for name in names]),
                pooled=np.asarray(pooled)[0])


def make_forward(out_dir):
    images = load_photos(CATDOG, FULL_SIDE, PHOTOS[:1])
    model = keras_xception((FULL_SIDE, FULL_SIDE, 3), NOTOP_WEIGHTS)
    np.savez_compressed(Path(out_dir) / 'network_forward.npz', photo=np.array(PHOTOS[0]),
                        **forward_summary(model, images))


def make_backward(out_dir, training):
    import keras
    images = load_photos(CATDOG, SMALL_SIDE)
    x = keras.applications.xception.preprocess_input(images.astype(np.float32)).astype(np.float64)
    model = keras_xception((SMALL_SIDE, SMALL_SIDE, 3), NOTOP_WEIGHTS, dtype='float64')
    upstream = upstream_gradient((len(x),) + tuple(model.output.shape[1:]))
    y, dx, grads = keras_gradients(model, x, upstream, training)
    arrays = {'images': images, 'upstream': upstream.astype(np.float16),
              'output_corner': y[FORWARD_SLICE], 'output_max_abs': np.abs(y).max(),
              'dx_sample': dx[INPUT_GRADIENT_SAMPLE]}
    for layer, weight, where in GRADIENT_SAMPLES:
        arrays[f'grad/{layer}/{weight}'] = grads[(layer, weight)][where]
    if training:
        for name in MOVING_STATISTICS_OF:
            gamma, beta, moving_mean, moving_variance = keras_layer(model, name).get_weights()
            arrays[f'moving_mean/{name}'] = moving_mean
            arrays[f'moving_variance/{name}'] = moving_variance
    mode = 'training' if training else 'inference'
    np.savez_compressed(Path(out_dir) / f'network_backward_{mode}.npz', **arrays)


def make_counts(out_dir):
    import keras
    official = {top: keras_xception((FULL_SIDE, FULL_SIDE, 3), include_top=top) for top in (True, False)}
    for top, model in official.items():
        rebuilt = keras_xception_blocks((FULL_SIDE, FULL_SIDE, 3), 8, include_top=top)
        assert rebuilt.count_params() == model.count_params(), 'the block builder drifted from Keras'
    deep = keras_xception_blocks((FULL_SIDE, FULL_SIDE, 3), 12)
    np.savez_compressed(
        Path(out_dir) / 'network_counts.npz',
        params_top=official[True].count_params(), params_notop=official[False].count_params(),
        params_middle12_notop=deep.count_params(), layers_middle12_notop=len(deep.layers) - 1,
        multiply_adds_top=keras_multiply_adds(official[True]), keras_version=keras.__version__)


def make(out_dir):
    if not NOTOP_WEIGHTS.exists():
        raise SystemExit(f'{NOTOP_WEIGHTS.name} is missing: run python weights/fetch.py first')
    make_forward(out_dir)
    make_backward(out_dir, training=False)
    make_backward(out_dir, training=True)
    make_counts(out_dir)
