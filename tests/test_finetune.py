"""Fine-tuning: freezing by block, the frozen part's output as input, one training step against
Keras, and the fine-tuned weights saved and reloaded.

The Keras side of the training step is tests/reference/make_finetune.py: it made the stored
fixture finetune_step.npz, and the live test calls the same function. The step: four real
photos at 128 px, the ImageNet weights, every layer before block 13 frozen, the head
Dense(256, relu) -> Dropout(0.5) -> Dense(1) with the same weights and the same dropout mask,
binary cross-entropy from the logit. The bar is the whole-network one: max |a - b| / max |b|
<= 1e-4 for every gradient.
"""
import json
import sys

import numpy as np
import pytest

import minixcept
from conftest import REFERENCE_DIR, relative_error
from minixcept import layers, optimizers
from minixcept.workflows.finetune import (FineTuneModel, FrozenFeatureFeed, cache_frozen_features, first_layer_of_block,
                                freeze_before, frozen_output_name)
from minixcept.xception import preprocess_input
from minixcept.files import images
from minixcept.files.cache import weights_checksum

sys.path.insert(0, str(REFERENCE_DIR))
import make_finetune as reference  # noqa: E402

TOLERANCE = 1e-4
STORED = REFERENCE_DIR / 'finetune_step.npz'


def build_head(seed=0):
    """The bottleneck recipe's head: Dense(256, relu) -> Dropout(0.5) -> Dense(1 logit)."""
    minixcept.set_seed(seed)
    return minixcept.Sequential([layers.Dense(256, activation='relu'), layers.Dropout(0.5), layers.Dense(1)],
                                input_shape=(2048,), name='head')


@pytest.fixture(scope='module')
def small_xception():
    """Xception with random weights at its smallest input: for the structure of freezing."""
    minixcept.set_seed(0)
    return minixcept.Xception(include_top=False, pooling='avg', input_shape=(71, 71, 3))


# -- freezing ---------------------------------------------------------------------------------
def test_freezing_before_block14_leaves_block14_and_nothing_else_trainable(small_xception):
    first = freeze_before(small_xception, 'block14')
    assert first == 'block14_sepconv1'
    trainable = [layer.name for layer in small_xception.layers if layer.trainable]
    assert trainable == ['block14_sepconv1', 'block14_sepconv1_bn', 'block14_sepconv1_act', 'block14_sepconv2',
                         'block14_sepconv2_bn', 'block14_sepconv2_act', 'global_average_pooling2d']
    assert frozen_output_name(small_xception, first) == 'add_11'


def test_block13_trains_with_its_shortcut(small_xception):
    first = freeze_before(small_xception, 'block13')
    assert first == 'block13_sepconv1_act'
    for name in ('conv2d_3', 'batch_normalization_3', 'add_11'):          # block 13's shortcut and sum
        assert small_xception.get_layer(name).trainable
    for name in ('add_10', 'block12_sepconv3_bn', 'batch_normalization_2'):
        assert not small_xception.get_layer(name).trainable
    assert frozen_output_name(small_xception, first) == 'add_10'


def test_block1_trains_everything(small_xception):
    first = freeze_before(small_xception, 'block1')
    assert first == 'block1_conv1'
    assert all(layer.trainable for layer in small_xception.layers)
    assert frozen_output_name(small_xception, first) is None


def test_unknown_block_and_cut_inside_a_block_are_refused(small_xception):
    with pytest.raises(ValueError, match='block14'):
        first_layer_of_block(small_xception, 'block15')
    with pytest.raises(ValueError, match='add_10'):        # block 13's shortcut still reads the block input
        frozen_output_name(small_xception, 'block13_sepconv2')


# -- the frozen part and a training step, on any backend ---------------------------------------
def test_cached_and_fed_frozen_outputs_agree_and_augmentation_is_seeded(xp, rng):
    minixcept.set_seed(1)
    base = minixcept.Xception(include_top=False, pooling='avg', input_shape=(71, 71, 3))
    network = FineTuneModel(base, build_head(), train_from='block14')
    pixels = rng.integers(0, 256, size=(3, 71, 71, 3), dtype=np.uint8)
    cached = cache_frozen_features(network, pixels, batch_size=2)
    assert cached.shape == (3,) + base.output_shape('add_11')[1:] and isinstance(cached, np.ndarray)
    plain = FrozenFeatureFeed(network, pixels)
    np.testing.assert_allclose(minixcept.asnumpy(plain[np.array([2, 0])]), cached[[2, 0]], rtol=0, atol=1e-5)
    layer_by_layer = FineTuneModel(base, network.head, train_from='block14', fast=False)
    slow = minixcept.asnumpy(layer_by_layer.frozen_features(minixcept.to_device(preprocess_input(pixels))))
    assert relative_error(cached, slow) <= 2e-5               # the fast engine agrees to float32 rounding
    augmented = FrozenFeatureFeed(network, pixels, rng=np.random.default_rng(5))[np.arange(3)]
    again = FrozenFeatureFeed(network, pixels, rng=np.random.default_rng(5))[np.arange(3)]
    np.testing.assert_array_equal(minixcept.asnumpy(augmented), minixcept.asnumpy(again))
    assert not np.allclose(minixcept.asnumpy(augmented), cached)


@pytest.mark.parametrize('bn_statistics', ['batch', 'moving'])
def test_a_step_moves_trainable_weights_only(xp, rng, bn_statistics):
    """Frozen layers get no gradient and keep their weights; trainable ones take the SGD step;
    a trainable batch-norm's moving statistics move with batch statistics and stay with moving."""
    minixcept.set_seed(2)
    base = minixcept.Xception(include_top=False, pooling='avg', input_shape=(71, 71, 3))
    network = FineTuneModel(base, build_head(), train_from='block14', bn_statistics=bn_statistics)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in network.layers}
    images = minixcept.to_device(preprocess_input(rng.integers(0, 256, (4, 71, 71, 3))))
    labels = minixcept.to_device(np.array([0, 1, 1, 0]))
    loss = minixcept.losses.BinaryCrossentropy(from_logits=True)
    learning_rate = 0.1

    loss.forward(network.forward(network.frozen_features(images), training=True), labels)
    network.backward(loss.backward())
    grads = {layer.name: {k: minixcept.asnumpy(g) for k, g in layer.grads.items()} for layer in network.layers}
    optimizers.SGD(learning_rate).apply_gradients(network.layers)

    for layer in network.layers:
        after = layer.get_weights()
        if not layer.trainable:
            assert grads[layer.name] == {}, f'{layer.name} is frozen: no backward may reach it'
            for old, new in zip(before[layer.name], after):
                np.testing.assert_array_equal(old, new, err_msg=f'frozen {layer.name} changed')
            continue
        for name, old, new in zip(layer.weight_names, before[layer.name], after):
            if name in ('moving_mean', 'moving_variance'):           # trainable batch-norm moves these
                moved = not np.array_equal(old, new)
                assert moved == (bn_statistics == 'batch'), f'{layer.name}/{name} moved: {moved}'
            else:
                np.testing.assert_allclose(new, old - learning_rate * grads[layer.name][name], rtol=1e-6,
                                           atol=1e-7, err_msg=f'{layer.name}/{name}')


# -- one step against Keras ---------------------------------------------------------------------
def minixcept_step(pixels, labels, weights_path, bn_statistics='batch', dtype=np.float32):
    """minixcept's numbers for reference.keras_finetune_step's inputs, keyed as it keys them."""
    base = minixcept.Xception(include_top=False, pooling='avg', input_shape=pixels.shape[1:])
    base.load_weights(weights_path)
    head = build_head()
    dense, dropout, logit = head.layers
    kernel, bias, logit_kernel, logit_bias = reference.head_weights()
    dense.set_weights([kernel, bias])
    logit.set_weights([logit_kernel, logit_bias])
    dropout.rng = np.random.default_rng(reference.DROPOUT_SEED)    # draws the mask Keras is given
    for layer in base.layers + head.layers:
        layer.astype(dtype)
    network = FineTuneModel(base, head, train_from=reference.TRAIN_FROM, bn_statistics=bn_statistics,
                            fast=dtype == np.float32)           # the fast engine computes in float32

    loss = minixcept.losses.BinaryCrossentropy(from_logits=True)
    frozen = network.frozen_features(minixcept.to_device(preprocess_input(pixels), dtype))
    logits = network.forward(frozen, training=True)
    value = loss.forward(logits, minixcept.to_device(labels))
    network.backward(loss.backward())

    names = {dense.name: 'head_dense', logit.name: 'head_logit'}
    grads, moving = {}, {}
    for layer in network.trainable_layers:
        for weight, gradient in layer.grads.items():
            grads[(names.get(layer.name, layer.name), weight)] = minixcept.asnumpy(gradient)
        if isinstance(layer, layers.BatchNormalization):
            for statistic in ('moving_mean', 'moving_variance'):
                moving[(layer.name, statistic)] = minixcept.asnumpy(layer.params[statistic])
    frozen_with_grads = [layer.name for layer in network.layers if not layer.trainable and layer.grads]
    return {'loss': float(value), 'logits': minixcept.asnumpy(logits).reshape(-1), 'grads': grads,
            'moving': moving, 'frozen_with_grads': frozen_with_grads}


def test_step_matches_the_stored_keras_step(xp, notop_weights):
    stored = np.load(STORED)
    np.testing.assert_allclose([np.abs(w).sum() for w in reference.head_weights()], stored['head_weight_sums'],
                               rtol=1e-6, err_msg='the head weights drawn now differ from the fixture')
    ours = minixcept_step(stored['pixels'], stored['labels'], notop_weights)
    assert ours['frozen_with_grads'] == []
    assert relative_error(ours['logits'], stored['logits']) <= TOLERANCE
    assert abs(ours['loss'] - stored['loss']) / abs(stored['loss']) <= TOLERANCE

    keys = [tuple(key.split('/')) for key in stored['grad_keys']]
    assert sorted(ours['grads']) == sorted(keys), 'the trainable tensors differ from Keras'
    errors = {}
    for layer, weight in keys:
        prefix = f'grad:{layer}/{weight}'
        gradient = ours['grads'][(layer, weight)].astype(np.float64)
        scale = stored[f'{prefix}:max_abs']
        if f'{prefix}:whole' in stored:
            errors[prefix] = relative_error(gradient, stored[f'{prefix}:whole'])
        else:
            sample = gradient.reshape(-1)[stored[f'{prefix}:positions']]
            errors[prefix] = float(np.abs(sample - stored[f'{prefix}:values']).max() / scale)
        assert abs(np.abs(gradient).max() - scale) <= TOLERANCE * scale, prefix
        assert abs(np.linalg.norm(gradient) - stored[f'{prefix}:norm']) <= TOLERANCE * stored[f'{prefix}:norm'], prefix
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f'{worst}: {errors[worst]:.2e}'

    for (layer, statistic), value in ours['moving'].items():
        assert relative_error(value, stored[f'moving:{layer}/{statistic}']) <= TOLERANCE, f'{layer}/{statistic}'


@pytest.fixture(scope='module')
def live_photos(catdog):
    """The fixture's four photos, loaded by minixcept's own loader."""
    pixels, loaded, failures = images.load_batch([catdog / p for p in reference.PHOTOS], reference.SIDE)
    assert not failures
    return pixels


# The bar is float32 against float32. With the base in inference mode ('moving'), one
# of these photos puts a value of 7e-7 into block14_sepconv1_act, and float32 rounding decides
# its sign differently in Keras and here: that ReLU's gradient then flows in one and not in
# the other (0.8% of block14_sepconv1's largest kernel gradient, every other column within
# 2e-6). In float64 no rounding comes near it, so that mode is compared in float64, where the
# two agree to about 5e-15 (the bar is 1e-10).
LIVE_CASES = [('batch', 'float32', TOLERANCE), ('batch', 'float64', 1e-10), ('moving', 'float64', 1e-10)]


@pytest.fixture(scope='module', params=LIVE_CASES, ids=['-'.join(case[:2]) for case in LIVE_CASES])
def keras_step(request, tf, notop_weights, live_photos):
    """Keras's step with the base called with training=True ('batch' statistics) or False
    ('moving'), in float32 or float64; with the tolerance for that case."""
    bn_statistics, dtype, tolerance = request.param
    step = reference.keras_finetune_step(live_photos, reference.LABELS, notop_weights,
                                         base_training=bn_statistics == 'batch', dtype=dtype)
    return bn_statistics, np.dtype(dtype), tolerance, step


def test_step_matches_keras_live(xp, keras_step, live_photos, notop_weights):
    bn_statistics, dtype, tolerance, keras_step = keras_step
    ours = minixcept_step(live_photos, reference.LABELS, notop_weights, bn_statistics, dtype)
    assert relative_error(ours['logits'], keras_step['logits']) <= tolerance
    assert sorted(ours['grads']) == sorted(keras_step['grads'])
    errors = {key: relative_error(ours['grads'][key], reference_gradient)
              for key, reference_gradient in keras_step['grads'].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f'{worst}: {errors[worst]:.2e}'
    assert len(ours['moving']) == len(keras_step['moving']) == 2 * 5      # block 13-14's five batch-norms
    for key, value in keras_step['moving'].items():
        assert relative_error(ours['moving'][key], value) <= tolerance, key


# -- the example, end to end on a few real photos ------------------------------------------------
def test_example_saves_weights_that_reload_to_the_same_accuracy(xp, tmp_path, notop_weights, catdog):
    sys.path.insert(0, str(REFERENCE_DIR.parents[1] / 'examples'))
    import catdog_bottleneck
    import catdog_finetune

    bottleneck_head = catdog_bottleneck.build_head(2048, 2, seed=3)
    base_id = 'sha256:' + weights_checksum(notop_weights, tmp_path)      # the base the head says it was trained on
    catdog_bottleneck.save_head(bottleneck_head, ['cats', 'dogs'], 96, base_id, tmp_path / 'bottleneck')
    out = tmp_path / 'finetune'
    status = catdog_finetune.main(['--head', str(tmp_path / 'bottleneck' / 'head.h5'), '--data', str(catdog),
                                   '--weights', str(notop_weights), '--limit', '3', '--epochs', '1',
                                   '--batch-size', '3', '--learning-rate', '1e-3', '--out', str(out),
                                   '--backend', minixcept.backend.current()])
    assert status == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['n_train'] == report['n_val'] == 6 and report['image_size'] == 96
    assert report['reloaded_val_accuracy'] == report['val_accuracy']
    assert report['reloaded_max_logit_difference'] <= 1e-4
    assert (out / 'curves.png').stat().st_size > 0

    # The saved base is a whole Xception in the loader's layout, different from ImageNet's now.
    fresh = minixcept.Xception(include_top=False, pooling='avg', input_shape=(96, 96, 3),
                               weights=out / 'xception_finetuned.h5')
    imagenet = minixcept.Xception(include_top=False, pooling='avg', input_shape=(96, 96, 3), weights=notop_weights)
    changed = [layer.name for layer, original in zip(fresh.layers, imagenet.layers)
               if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), original.get_weights()))]
    assert changed and all(name.startswith('block14_') for name in changed), changed
