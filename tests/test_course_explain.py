"""The grader of the Grad-CAM exercise (minixcept/course/explain.py). The textbook's cam_from
passes; each wrong map below, written as a learner writes it, fails with the case, the output
and the mistake named. The fixture it grades on (course_explain.npz) agrees with
explain_gradcam.npz and, when TensorFlow is installed, with Keras run now."""
import sys

import numpy as np
import pytest

from conftest import REFERENCE_DIR
from minixcept import course
from minixcept.workflows.explain import cam_from

sys.path.insert(0, str(REFERENCE_DIR))
import make_course_explain  # noqa: E402


# -- right and wrong answers a learner writes ------------------------------------------------

def right_by_hand(activation, gradient):
    alpha = gradient.mean(axis=(1, 2))                                   # (N, K)
    return np.maximum(np.einsum('nijk,nk->nij', activation, alpha), 0)


def sum_over_the_grid(activation, gradient):
    alpha = gradient.sum(axis=(1, 2), keepdims=True)
    return np.maximum((alpha * activation).sum(axis=3), 0)


def relu_left_out(activation, gradient):
    alpha = gradient.mean(axis=(1, 2), keepdims=True)
    return (alpha * activation).sum(axis=3)


def mean_over_channels(activation, gradient):
    alpha = gradient.mean(axis=3, keepdims=True)
    return np.maximum((alpha * activation).sum(axis=3), 0)


def weights_on_the_gradient(activation, gradient):
    alpha = gradient.mean(axis=(1, 2), keepdims=True)
    return np.maximum((alpha * gradient).sum(axis=3), 0)


def normalised_for_the_picture(activation, gradient):
    cam = right_by_hand(activation, gradient)
    return cam / cam.max(axis=(1, 2), keepdims=True)


def channel_axis_kept(activation, gradient):
    alpha = gradient.mean(axis=(1, 2), keepdims=True)
    return np.maximum((alpha * activation).sum(axis=3, keepdims=True), 0)


def test_the_model_answer_and_a_hand_written_one_pass():
    for answer in (cam_from, right_by_hand):
        verdict = course.check_grad_cam(answer)
        assert verdict, str(verdict)
        assert 'correct - all 2 cases pass' in str(verdict)


WRONG = [
    (sum_over_the_grid, ['predicted class', 'map differs', 'sum over the grid', 'h * w = 16']),
    (relu_left_out, ['predicted class', 'map differs', 'leaving the ReLU out']),
    (mean_over_channels, ['predicted class', 'map differs', 'mean over the channels']),
    (weights_on_the_gradient, ['predicted class', 'map differs', 'to the gradient instead of the activation']),
    (normalised_for_the_picture, ['predicted class', 'map differs', 'dividing the map by its maximum']),
    (channel_axis_kept, ['map has shape (2, 4, 4, 1), expected (2, 4, 4)']),
]


@pytest.mark.parametrize('wrong, words', WRONG, ids=[w[0].__name__ for w in WRONG])
def test_each_classic_mistake_fails_with_its_place_named(wrong, words):
    verdict = course.check_grad_cam(wrong)
    assert not verdict
    text = str(verdict)
    for word in words:
        assert word in text, text
    assert 'Model answer: minixcept.workflows.explain.cam_from' in text


def test_the_relu_matters_in_both_cases():
    """Both stored maps have cells the ReLU sets to 0, so leaving it out fails each case."""
    with np.load(REFERENCE_DIR / 'course_explain.npz') as stored:
        a, g = stored['activation'].astype(np.float64), stored['gradient'].astype(np.float64)
    for sign in (1, -1):
        before_relu = (sign * g.mean(axis=(1, 2), keepdims=True) * a).sum(axis=3)
        assert (before_relu < 0).any() and (before_relu > 0).any()


def test_the_fixture_is_explain_gradcams_photos_head_and_layer():
    """course_explain.npz holds what explain_gradcam.npz keeps only a slice of: the same
    classes, its 32-channel gradient slice and its map, to float32 rounding."""
    with np.load(REFERENCE_DIR / 'course_explain.npz') as course_arrays, \
            np.load(REFERENCE_DIR / 'explain_gradcam.npz') as explain_arrays:
        layer = make_course_explain.LAYER
        np.testing.assert_array_equal(course_arrays['classes'], explain_arrays['classes'])
        sliced = explain_arrays[f'gradient/{layer}']
        assert np.abs(course_arrays['gradient'][..., :32] - sliced).max() <= 1e-6 * np.abs(sliced).max()
        cam = explain_arrays[f'cam/{layer}']
        assert np.abs(course_arrays['cam'] - cam).max() <= 1e-6 * np.abs(cam).max()


def test_the_stored_maps_are_what_tensorflow_computes_now(tf):
    with np.load(REFERENCE_DIR / 'course_explain.npz') as stored:
        fresh = make_course_explain.arrays_from(stored['classes'], stored['activation'], stored['gradient'])
        for name in ('cam', 'cam_other'):
            np.testing.assert_allclose(stored[name], fresh[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_the_stored_activation_and_gradient_are_what_keras_gives_now(tf, notop_weights, catdog):
    classes, activation, gradient, other = make_course_explain.keras_block14(catdog, notop_weights)
    np.testing.assert_array_equal(other, -gradient)
    with np.load(REFERENCE_DIR / 'course_explain.npz') as stored:
        np.testing.assert_array_equal(stored['classes'], classes)
        for name, fresh in (('activation', activation), ('gradient', gradient)):
            assert np.abs(stored[name] - fresh).max() <= 1e-6 * np.abs(fresh).max(), name
