"""Exercise on Grad-CAM: the channel weights and the map (tour chapter 8).

The learner writes the function of ``minixcept/workflows/explain.py`` that is the model answer:

    grad_cam_map(activation, gradient) -> map
        activation A (N, h, w, K), gradient ds/dA of the same shape -> map (N, h, w), >= 0

    alpha[n, k]  = mean over (i, j) of gradient[n, i, j, k]
    map[n, i, j] = ReLU(sum_k alpha[n, k] A[n, i, j, k])         (not normalised)

The reference is TensorFlow's: the cat and the dog of tests/reference/explain_gradcam.npz at
128 px through Xception with the ImageNet weights and a random-weight head, at
block14_sepconv2_act (4 x 4 x 2048). explain_gradcam.npz keeps TensorFlow's maps but only a
slice of the gradient, so the whole activation and gradient come from course_explain.npz
(tests/reference/make_course_explain.py: GradientTape, the same photos, head and layer);
the first case grades against explain_gradcam.npz's own maps, the second against
TensorFlow's map for the other class (gradient -ds/dA), where the ReLU does most of its work.

A wrong map is compared with what the classic mistakes give: the sum over the grid instead
of the mean, the ReLU left out, the mean taken over the channels instead of the grid, the
channel weights applied to the gradient instead of the activation, and the map divided by
its maximum (a picture's scaling, which the function does not do).
"""
import numpy as np

from ..workflows.explain import cam_from
from . import grader
from .grader import FORWARD_TOLERANCE, Wrong

MODEL_ANSWER = 'minixcept.workflows.explain.cam_from'
LAYER = 'block14_sepconv2_act'


# -- what the classic mistakes give -------------------------------------------------------

def mistaken_maps(activation, gradient):
    """(the mistake, the map it gives), for one activation and gradient (float64)."""
    relu = lambda m: np.maximum(m, 0)                                      # noqa: E731
    alpha = gradient.mean(axis=(1, 2), keepdims=True)                       # (N, 1, 1, K)
    right = relu((alpha * activation).sum(axis=3))
    largest = right.max(axis=(1, 2), keepdims=True)
    return [
        ("the sum over the grid in place of the mean (alpha_k = the sum over i, j of the gradient, "
         f"h * w = {activation.shape[1] * activation.shape[2]} times the mean)",
         relu((gradient.sum(axis=(1, 2), keepdims=True) * activation).sum(axis=3))),
        ("leaving the ReLU out (the map keeps its negative values: the cells where the channels "
         "that fire speak against the class)", (alpha * activation).sum(axis=3)),
        ("the mean over the channels in place of the grid (alpha = gradient.mean(axis=3); alpha_k "
         "is the mean of channel k's gradient over the h x w cells)",
         relu((gradient.mean(axis=3, keepdims=True) * activation).sum(axis=3))),
        ("applying the channel weights to the gradient instead of the activation (the map is "
         "sum_k alpha_k A_k: where the channels that matter fire)", relu((alpha * gradient).sum(axis=3))),
        ("dividing the map by its maximum (scaling to [0, 1] is for the picture; the function "
         "returns the map itself)", right / np.where(largest > 0, largest, 1)),
    ]


def _hint(index, shape):
    return ("alpha_k is the mean of the gradient of channel k over the grid (axes 1 and 2), "
            "and the map is ReLU(sum over k of alpha_k * activation[..., k]).")


# -- the check ------------------------------------------------------------------------------

def _case(grad_cam_map, activation, gradient, want, reference):
    result = grader.call(grad_cam_map, activation.copy(), gradient.copy())
    if isinstance(result, tuple):
        raise Wrong(f"the function returned a tuple of {len(result)}; it returns the map alone, "
                    f"an array of shape {want.shape} (N, h, w).")
    grader.compare('map', result, want, FORWARD_TOLERANCE, layout='NHW',
                   mistakes=mistaken_maps(activation, gradient), hint=_hint, reference=reference)


def check_grad_cam(grad_cam_map):
    """Grade ``grad_cam_map(activation, gradient) -> map``: (N, h, w, K) twice -> (N, h, w)."""
    def predicted():
        (activation, gradient), maps = _arrays()
        _case(grad_cam_map, activation, gradient, maps['explain_gradcam'],
              'TensorFlow (explain_gradcam.npz)')

    def other():
        (activation, gradient), maps = _arrays()
        _case(grad_cam_map, activation, -gradient, maps['other'], 'TensorFlow')

    cases = [
        (f"TensorFlow, {LAYER} of Xception at 128 px (4x4x2048), a cat and a dog, each its "
         f"predicted class", predicted),
        ("TensorFlow, the same photos, the other class (gradient -ds/dA: the evidence against)", other),
    ]
    return grader.grade('Grad-CAM map', cases, MODEL_ANSWER)


def _arrays():
    """((activation, gradient) as float64, {'explain_gradcam', 'other'} maps) from the fixtures."""
    for name in ('course_explain', 'explain_gradcam'):
        if not (grader.REFERENCE_DIR / f'{name}.npz').exists():
            raise FileNotFoundError(f"the grader's TensorFlow fixtures are not here: "
                                    f"{grader.REFERENCE_DIR / name}.npz is missing (they come with a "
                                    f"clone of the minixcept repository)")
    with np.load(grader.REFERENCE_DIR / 'course_explain.npz') as course, \
            np.load(grader.REFERENCE_DIR / 'explain_gradcam.npz') as explain:
        inputs = (course['activation'].astype(np.float64), course['gradient'].astype(np.float64))
        maps = {'explain_gradcam': explain[f'cam/{LAYER}'], 'other': course['cam_other']}
    return inputs, maps


# The model answer, for the tests and the tour.
model_answers = {check_grad_cam: cam_from}
