"""Xception against Keras, live: the real ImageNet weights at every named layer, the whole
backward pass against GradientTape, the parameter and multiply-add counts.

Forward runs in float32 against the project's bar for the whole network with real weights:
max |a - b| / max |b| <= 1e-4 at every one of the 131 named layers, for the official file
and for the same weights written by Keras 3. The backward pass is compared in float64
(tests/reference/make_network.py explains why float32 cannot be compared reliably through
~3 million ReLU kinks), where the two must agree to rounding (FLOAT64_TOLERANCE).

The Keras models are built once per module with the helpers that made the stored
fixtures, so the live and the stored comparisons feed Keras the same way.
"""
import sys

import h5py
import numpy as np
import pytest

import minixcept
from conftest import REFERENCE_DIR, relative_error
from test_xception import FLOAT64_TOLERANCE, as_float64, assert_within

sys.path.insert(0, str(REFERENCE_DIR))
import make_any_size as any_size  # noqa: E402
import make_network as reference  # noqa: E402

FULL_SHAPE = (reference.FULL_SIDE, reference.FULL_SIDE, 3)
SMALL_SHAPE = (reference.SMALL_SIDE, reference.SMALL_SIDE, 3)


# -- Keras, once per module ---------------------------------------------------------
@pytest.fixture(scope='module')
def photos(catdog):
    """The cat and the dog at 299 x 299, uint8."""
    return reference.load_photos(catdog, reference.FULL_SIDE)


@pytest.fixture(scope='module')
def keras_notop(tf, notop_weights):
    """keras.applications.Xception at 299 px with the official file loaded by Keras itself."""
    return reference.keras_xception(FULL_SHAPE, notop_weights)


@pytest.fixture(scope='module')
def keras_activations(tf, keras_notop, photos):
    import keras
    x = keras.applications.xception.preprocess_input(photos.astype(np.float32))
    return reference.keras_activations(keras_notop, x)


@pytest.fixture(scope='module')
def keras3_legacy_file(tmp_path_factory, keras_notop):
    """The same weights written by Keras 3's own legacy HDF5 writer (Keras 3 layer names,
    its own weight names, an extra top_level_model_weights group)."""
    from keras.src.legacy.saving import legacy_h5_format
    path = tmp_path_factory.mktemp('keras3') / 'xception_notop_keras3_legacy.h5'
    with h5py.File(path, 'w') as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_notop)
    return path


@pytest.fixture(scope='module', params=[False, True], ids=['bn_inference', 'bn_training'])
def keras_backward(request, tf, notop_weights, catdog):
    """GradientTape results in float64 for 2 x 96 x 96 x 3 photos and a random output
    gradient, with batch-norm in inference (training=False) or training mode (training=True)."""
    import keras
    training = request.param
    model = reference.keras_xception(SMALL_SHAPE, notop_weights, dtype='float64')
    images = reference.load_photos(catdog, reference.SMALL_SIDE)
    x = keras.applications.xception.preprocess_input(images.astype(np.float32)).astype(np.float64)
    upstream = reference.upstream_gradient((len(x),) + tuple(model.output.shape[1:])).astype(np.float64)
    batch_norms = {name: layer for name, layer in zip(reference.canonical_names(model), model.layers[1:])
                   if isinstance(layer, keras.layers.BatchNormalization)}
    moving = lambda: {name: [np.array(w) for w in layer.get_weights()[2:]]  # noqa: E731
                      for name, layer in batch_norms.items()}
    moving_before = moving()
    y, dx, grads = reference.keras_gradients(model, x, upstream, training)
    return dict(training=training, x=x, upstream=upstream, y=y, dx=dx, grads=grads,
                moving_before=moving_before, moving_after=moving(),
                momentum=batch_norms['batch_normalization'].momentum)


# -- forward with the real weights ----------------------------------------------------
def test_official_and_keras3_files_are_different_layouts(notop_weights, keras3_legacy_file):
    """The two files really differ where ports break: the residual layers' names."""
    def layer_names(path):
        with h5py.File(path, 'r') as f:
            return [n.decode() if isinstance(n, bytes) else n for n in f.attrs['layer_names']]
    official, written = layer_names(notop_weights), layer_names(keras3_legacy_file)
    assert 'conv2d_1' in official and 'conv2d' not in official          # Keras 2 numbering
    assert official[0] == 'input_1' and written[0].startswith('input_layer')
    assert len(official) == len(written) == 132
    assert official != written


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['official_keras2_file', 'keras3_legacy_writer'])
def test_every_layer_matches_keras_with_real_weights(xp, layout, notop_weights, keras3_legacy_file,
                                                     photos, keras_notop, keras_activations):
    """All 131 named activations of the notop model on a cat and a dog at 299 px."""
    path = notop_weights if layout == 'official_keras2_file' else keras3_legacy_file
    model = minixcept.Xception(include_top=False, weights=path, input_shape=FULL_SHAPE)
    assert [layer.name for layer in model.layers] == reference.canonical_names(keras_notop)
    x = xp.asarray(minixcept.preprocess_input(photos))
    with minixcept.no_grad():
        _, activations = model.forward(x, capture='all')
    assert len(activations) == len(keras_activations) == 131
    errors = {name: relative_error(activations[name], expected) for name, expected in keras_activations.items()}
    assert_within(errors, f'forward, {layout}')


def test_loaded_weights_equal_keras_weights(notop_weights, keras_notop):
    """Loading by order put every Keras tensor in the layer of the same name."""
    model = minixcept.Xception(include_top=False, weights=notop_weights, input_shape=FULL_SHAPE)
    for name, keras_layer in zip(reference.canonical_names(keras_notop), keras_notop.layers[1:]):
        ours = model.get_layer(name).get_weights()
        theirs = keras_layer.get_weights()
        assert len(ours) == len(theirs), name
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.fixture(scope='module')
def keras_any_size(tf, notop_weights):
    """keras.applications.Xception(include_top=False) with input_shape left out: (None, None, 3)."""
    model = reference.keras_xception(None, notop_weights)
    assert tuple(model.input.shape) == (None, None, None, 3)
    return model


@pytest.mark.parametrize('height, width', any_size.SIZES)
def test_any_size_model_matches_keras_with_real_weights(catdog, notop_weights, keras_any_size, height, width):
    """The cat and the dog at 224 x 224 and at 180 x 240 through both models built for any
    size: all 131 named activations."""
    import keras
    images = reference.load_photos(catdog, (height, width))
    expected = reference.keras_activations(
        keras_any_size, keras.applications.xception.preprocess_input(images.astype(np.float32)))
    model = minixcept.Xception(include_top=False, weights=notop_weights, input_shape=None)
    with minixcept.no_grad():
        _, activations = model.forward(minixcept.preprocess_input(images), capture='all')
    assert len(activations) == len(expected) == 131
    errors = {name: relative_error(activations[name], value) for name, value in expected.items()}
    assert_within(errors, f'any size, {height} x {width}, live')


def test_set_weights_takes_keras_get_weights(keras_notop, notop_weights):
    """Model.set_weights(keras_model.get_weights()): the same order as Keras, so every layer
    ends up with what loading the file by order gives it."""
    model = minixcept.Xception(include_top=False)
    model.set_weights(keras_notop.get_weights())
    loaded = minixcept.Xception(include_top=False, weights=notop_weights)
    for ours, theirs in zip(model.layers, loaded.layers):
        for a, b in zip(ours.get_weights(), theirs.get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=ours.name)


@pytest.mark.parametrize('include_top, frozen', [(False, False), (True, False), (False, True)])
def test_trainable_split_matches_keras(tf, include_top, frozen):
    keras_model = reference.keras_xception(None, include_top=include_top)
    model = minixcept.Xception(include_top=include_top)
    if frozen:
        any_size.freeze_before(keras_model, any_size.FROZEN_BEFORE)
        for layer in model.layers[:model.layers.index(model.get_layer(any_size.FROZEN_BEFORE))]:
            layer.trainable = False
    assert (model.count_params(trainable=True), model.count_params(trainable=False)) == \
        any_size.keras_split(keras_model)


# -- backward against GradientTape ----------------------------------------------------
def test_whole_network_backward_matches_gradient_tape(xp, keras_backward, notop_weights):
    """Output, input gradient and all 154 weight gradients in float64 (see FLOAT64_TOLERANCE
    for why not float32), and in training mode the batch statistics behind every updated
    moving mean and variance."""
    k = keras_backward
    mode = 'training' if k['training'] else 'inference'
    model = as_float64(minixcept.Xception(include_top=False, weights=notop_weights, input_shape=SMALL_SHAPE))
    y = model.forward(xp.asarray(k['x']), training=k['training'])
    dx = model.backward(xp.asarray(k['upstream']))

    errors = {'output (block14_sepconv2_act)': relative_error(y, k['y']),
              'input gradient': relative_error(dx, k['dx'])}
    for (layer, weight), expected in k['grads'].items():
        errors[f'{layer}/{weight}'] = relative_error(model.get_layer(layer).grads[weight], expected)
    assert len(k['grads']) == 2 * 40 + 2 * 34 + 6       # gamma/beta of 40 BNs, 34 sepconvs, 6 convs
    assert {f'{layer}/{weight}' for layer, weight, _ in reference.GRADIENT_SAMPLES} <= set(errors)
    assert_within(errors, f'backward, batch-norm {mode}', FLOAT64_TOLERANCE)

    if k['training']:
        # Each moving statistic moved toward the batch's: compare the batch statistic it
        # implies, (new - momentum * old) / (1 - momentum), so the 99 % that is the old
        # value cannot hide an error in the 1 % that is new.
        momentum = k['momentum']
        moving_errors = {}
        for name, before_pair in k['moving_before'].items():
            layer = model.get_layer(name)
            after_pair = k['moving_after'][name]
            for key, before, after in zip(('moving_mean', 'moving_variance'), before_pair, after_pair):
                assert not np.array_equal(after, before), f'Keras did not move {name} {key}'
                implied = lambda moved: (moved - momentum * before) / (1 - momentum)  # noqa: E731
                moving_errors[f'{name}/{key}'] = relative_error(implied(minixcept.asnumpy(layer.params[key])),
                                                                implied(after))
        assert len(moving_errors) == 2 * 40
        assert_within(moving_errors, 'batch statistics behind the moving statistics', FLOAT64_TOLERANCE)


def test_top_matches_keras_with_random_weights(xp, tf):
    """include_top=True (average pool + softmax Dense) with random Keras weights copied in
    by order, float64: predictions, the input gradient and a sample of weight gradients.
    Any random weights will do, so Keras's global seed is left alone."""
    shape, classes = (71, 71, 3), 10
    keras_model = reference.keras_xception(shape, include_top=True, classes=classes, dtype='float64')
    model = as_float64(minixcept.Xception(include_top=True, input_shape=shape, classes=classes))
    names = reference.canonical_names(keras_model)
    assert [layer.name for layer in model.layers] == names
    for name, keras_layer in zip(names, keras_model.layers[1:]):
        if keras_layer.get_weights():
            model.get_layer(name).set_weights(keras_layer.get_weights())

    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2,) + shape)
    upstream = rng.standard_normal((2, classes))
    y_expected, dx_expected, grads = reference.keras_gradients(keras_model, x, upstream, training=False)

    y = model.forward(xp.asarray(x))
    dx = model.backward(xp.asarray(upstream))
    errors = {'predictions': relative_error(y, y_expected), 'input gradient': relative_error(dx, dx_expected)}
    for layer, weight in (('predictions', 'kernel'), ('predictions', 'bias'), ('block1_conv1', 'kernel'),
                          ('block8_sepconv2', 'pointwise_kernel'), ('block14_sepconv2_bn', 'gamma')):
        errors[f'{layer}/{weight}'] = relative_error(model.get_layer(layer).grads[weight], grads[(layer, weight)])
    assert_within(errors, 'top, random weights', FLOAT64_TOLERANCE)


# -- counts ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def keras_top(tf):
    return reference.keras_xception(FULL_SHAPE, include_top=True)


def keras_layer_table(keras_model):
    """Sorted (type, output shape, parameters) of every layer but the input: the model's
    content without its wiring order, which Keras and a builder may list differently."""
    return sorted((type(layer).__name__, tuple(layer.output.shape[1:]), layer.count_params())
                  for layer in keras_model.layers[1:])


def test_block_builder_is_keras_xception(keras_notop, keras_top):
    """The layer-by-layer Keras builder used for deeper middle flows rebuilds Keras's
    Xception at 8 blocks: the same layers (type, output shape, parameters)."""
    for official, top in ((keras_notop, False), (keras_top, True)):
        rebuilt = reference.keras_xception_blocks(FULL_SHAPE, 8, include_top=top)
        assert keras_layer_table(rebuilt) == keras_layer_table(official)
        assert rebuilt.count_params() == official.count_params()


@pytest.mark.parametrize('include_top, middle_blocks', [(True, 8), (False, 8), (False, 12)])
def test_parameter_counts_match_keras(include_top, middle_blocks, keras_notop, keras_top):
    if middle_blocks == 8:
        keras_model = keras_top if include_top else keras_notop
    else:
        keras_model = reference.keras_xception_blocks(FULL_SHAPE, middle_blocks, include_top=include_top)
    model = minixcept.Xception(include_top=include_top, input_shape=FULL_SHAPE, middle_blocks=middle_blocks)
    assert model.count_params() == keras_model.count_params()
    ours = sorted((type(layer).__name__, model.output_shape(layer.name)[1:], layer.count_params())
                  for layer in model.layers)
    assert ours == keras_layer_table(keras_model)


def test_multiply_adds_match_keras(keras_top):
    model = minixcept.Xception(include_top=True, input_shape=FULL_SHAPE)
    expected = reference.keras_multiply_adds(keras_top)
    assert model.multiply_adds() == expected
    assert expected == pytest.approx(8.36e9, rel=1e-3)
