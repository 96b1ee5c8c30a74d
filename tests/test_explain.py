"""Grad-CAM and saliency (minixcept.workflows.explain) against TensorFlow's GradientTape.

A cat and a dog at 128 px through Xception with the real ImageNet weights and a saved
head of the cat/dog recipe's shape: the Grad-CAM maps at three layers (block14's last
activation; add_6, a middle-flow block output read by two layers; block8_sepconv3_act,
read by one), the activation gradients behind them, the input gradient and the SmoothGrad
average, all in float64 (tests/reference/make_explain.py says why), against the stored
fixture and, when TensorFlow is installed, against Keras run now. A small graph checks the
fan-out sum against finite differences.
"""
import sys

import numpy as np
import pytest

import minixcept
from conftest import REFERENCE_DIR, relative_error
from test_catdog import load_example
from minixcept import layers as L
from minixcept.engines.training import GradientEngine
from minixcept.workflows import explain
from test_xception import FLOAT64_TOLERANCE, as_float64, assert_within

sys.path.insert(0, str(REFERENCE_DIR))
import make_explain as reference  # noqa: E402
import make_network  # noqa: E402

SHAPE = (reference.SIDE, reference.SIDE, 3)


def catdog_head():
    """examples/catdog_bottleneck.py's head: Dense(256, relu) -> Dropout(0.5) -> Dense(1)."""
    return minixcept.Sequential([L.Dense(reference.HEAD_UNITS, activation='relu'), L.Dropout(0.5), L.Dense(1)],
                                input_shape=(2048,), name='head')


@pytest.fixture(scope='module')
def saved_head(tmp_path_factory):
    """The fixture's head weights, written as the recipe saves a head (legacy Keras HDF5)."""
    head = catdog_head()
    head.layers[0].set_weights(reference.head_weights(2048)[:2])
    head.layers[2].set_weights(reference.head_weights(2048)[2:])
    path = tmp_path_factory.mktemp('head') / 'head.h5'
    head.save_weights(path)
    return path


@pytest.fixture(params=['stored', 'live'])
def keras_reference(request, catdog):
    """{'classes', 'cam/<layer>', 'gradient/<layer>' (a channel slice), 'input_gradient',
    'smoothgrad' (samples)}: from explain_gradcam.npz, or from Keras now."""
    if request.param == 'stored':
        with np.load(REFERENCE_DIR / 'explain_gradcam.npz') as arrays:
            return dict(arrays)
    request.getfixturevalue('tf')
    import keras
    notop_weights = request.getfixturevalue('notop_weights')
    images = make_network.load_photos(catdog, reference.SIDE)
    x = keras.applications.xception.preprocess_input(images.astype(np.float32)).astype(np.float64)
    base = make_network.keras_xception(SHAPE, notop_weights, dtype='float64')
    head = reference.keras_head(reference.head_weights(2048))
    classes, results, dx = reference.keras_explanations(base, head, x, reference.GRADCAM_LAYERS)
    found = {'images': images, 'classes': classes, 'input_gradient': dx[reference.GRADIENT_SAMPLE],
             'smoothgrad': reference.keras_smoothgrad(base, head, x, classes,
                                                      **reference.SMOOTHGRAD)[reference.GRADIENT_SAMPLE]}
    for name, (_, gradient, cam) in results.items():
        found[f'cam/{name}'], found[f'gradient/{name}'] = cam, gradient[reference.CHANNEL_SAMPLE]
    return found


def float64_pair(notop_weights, saved_head):
    model = as_float64(minixcept.Xception(include_top=False, pooling='avg', weights=notop_weights,
                                          input_shape=SHAPE))
    head = catdog_head()
    head.load_weights(saved_head)
    return model, as_float64(head)


def test_gradcam_and_input_gradient_match_gradient_tape(xp, keras_reference, notop_weights, saved_head):
    k = keras_reference
    model, head = float64_pair(notop_weights, saved_head)
    x = xp.asarray(minixcept.preprocess_input(k['images']).astype(np.float64))
    errors = {}
    for layer in reference.GRADCAM_LAYERS:
        _, classes, activation, gradient = explain.gradient_at(model, head, x, layer)
        np.testing.assert_array_equal(classes, k['classes'])          # the predicted class, as Keras's
        errors[f'd score / d {layer}'] = relative_error(gradient[reference.CHANNEL_SAMPLE], k[f'gradient/{layer}'])
        errors[f'Grad-CAM at {layer}'] = relative_error(explain.cam_from(activation, gradient), k[f'cam/{layer}'])
    plain = explain.saliency(model, head, x, noise=0, class_index=k['classes'])
    errors['input gradient'] = relative_error(plain[reference.GRADIENT_SAMPLE], k['input_gradient'])
    # SmoothGrad through the training engine (a runner: forward and backward only), which
    # takes several backward passes a third of the time the plain layers take
    smooth = explain.saliency(GradientEngine(model), head, x, class_index=k['classes'], **reference.SMOOTHGRAD)
    errors['SmoothGrad (training engine)'] = relative_error(smooth[reference.GRADIENT_SAMPLE], k['smoothgrad'])
    assert all(np.abs(k[f'cam/{layer}']).max() > 0 for layer in reference.GRADCAM_LAYERS)
    assert_within(errors, 'explanations against GradientTape', FLOAT64_TOLERANCE)


def test_the_predicted_class_is_fits_from_logits(xp):
    """With no class_index, the class explained is the one ``fit`` scores from logits: one
    logit means class 1 when z > 0 (not z > 0.5, the threshold for probabilities); K logits,
    the argmax; handed back as a NumPy array on any backend."""
    assert explain.predicted_classes is minixcept.workflows.fit.predicted_classes

    def dense(kernel):
        network = minixcept.Sequential([L.Dense(len(kernel), use_bias=False)], input_shape=(1,))
        network.layers[0].set_weights([xp.asarray([kernel])])
        return network
    x = xp.asarray([[0.3], [-0.2], [0.0]])
    for head, expected in ((dense([1.0]), [1, 0, 0]), (dense([1.0, -1.0, 0.5]), [0, 1, 0])):
        _, classes, _, _ = explain.gradient_at(dense([1.0]), head, x)
        assert type(classes) is np.ndarray and classes.tolist() == expected
    np.testing.assert_array_equal(minixcept.asnumpy(explain.saliency(dense([1.0]), dense([1.0]), x, noise=0)),
                                  [[1.0], [-1.0], [-1.0]])      # ds/dx = +1 for class 1, -1 for class 0


# -- the fan-out sum, on a graph small enough for finite differences ---------------------
class Forked(minixcept.Model):
    """input -> stem (conv) -> left (ReLU) -> left_conv -> join = left_conv + stem -> pool:
    the stem's output is read by two layers, ``left`` and ``join``."""

    def __init__(self):
        super().__init__((5, 5, 2), name='forked')
        self.add(L.Conv2D(3, 3, padding='same', name='stem'))
        self.add(L.ReLU(name='left'), 'stem')
        self.add(L.Conv2D(3, 3, padding='same', name='left_conv'), 'left')
        self.add(L.Add(name='join'), 'left_conv', 'stem')
        self.add(L.GlobalAveragePooling2D(name='pool'), 'join')


def test_gradient_at_a_fanned_out_tensor_is_the_sum_of_its_readers(rng):
    minixcept.set_seed(3)
    model = Forked()
    head = minixcept.Sequential([L.Dense(2)], input_shape=(3,))
    for layer in model.layers + head.layers:
        layer.astype(np.float64)
    x = rng.standard_normal((2, 5, 5, 2))
    classes = np.array([0, 1])
    _, _, stem, gradient = explain.gradient_at(model, head, x, 'stem', classes)

    def score_from_stem():                       # s as a function of the stem's output alone
        logits = head.forward(model.forward(stem, start_after='stem'))
        return logits[np.arange(2), classes]

    numeric = minixcept.gradcheck.numerical_gradient(score_from_stem, stem, np.ones(2))
    assert minixcept.gradcheck.rel_error(gradient, numeric) < 1e-8
    # One reader's share (through the ReLU) is not the total:
    _, _, left, through_left = explain.gradient_at(model, head, x, 'left', classes)
    assert minixcept.gradcheck.rel_error(through_left * (stem > 0), gradient) > 0.1
    np.testing.assert_array_equal(explain.grad_cam(model, head, x, 'stem', classes),
                                  explain.cam_from(stem, gradient))


def test_class_index_out_of_range_is_named():
    with pytest.raises(ValueError, match=r'0\.\.1 for a head with 1 logit'):
        explain.class_scores(np.zeros((2, 1)), [0, 2])
    scores, dlogits = explain.class_scores(np.array([[2.0], [-3.0]]), [0, 0])
    np.testing.assert_array_equal(scores, [-2.0, 3.0])          # class 0's score is -z
    np.testing.assert_array_equal(dlogits, [[-1.0], [-1.0]])


def test_gradcam_names_a_layer_without_a_map():
    model = minixcept.Xception(include_top=False, pooling='avg', input_shape=(71, 71, 3))
    head = catdog_head()
    with pytest.raises(ValueError, match='global_average_pooling2d'):
        explain.grad_cam(model, head, np.zeros((1, 71, 71, 3), np.float32), 'global_average_pooling2d')


# -- the example ---------------------------------------------------------------------------
def test_catdog_explain_writes_one_picture_per_photo(catdog, tmp_path, capsys):
    """The example end to end on a cat and a dog, fast: an untrained base at 71 px, a saved
    head, 2 saliency samples; one line and one three-panel PNG per photo."""
    from PIL import Image
    bottleneck = load_example('catdog_bottleneck')
    head = bottleneck.build_head(2048, 2)
    bottleneck.save_head(head, ['cats', 'dogs'], 71, 'random-init-seed-0', tmp_path)
    photos = [catdog / relative for relative in make_network.PHOTOS]
    example = load_example('catdog_explain')
    code = example.main([str(p) for p in photos] + ['--head', str(tmp_path / 'head.h5'), '--weights', 'random',
                                                    '--samples', '2', '--layer', 'block4_pool',
                                                    '--out', str(tmp_path / 'pictures'), '--panel', '64'])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, photo in zip(lines, photos):
        path, class_name, probability, picture = line.split('\t')[:4]
        assert path == str(photo) and class_name in ('cats', 'dogs') and 0.5 <= float(probability) <= 1
        with Image.open(picture) as image:
            assert image.size == (3 * 64, 64 + example.CAPTION_HEIGHT)
