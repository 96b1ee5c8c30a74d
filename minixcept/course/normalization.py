"""Exercise on batch normalization: its training-mode backward pass (tour chapter 4).

The learner writes the backward pass with the textbook's signature, so the textbook's own
function in ``minixcept/layers/normalization.py`` is the model answer:

    batch_norm_backward(dy, cache) -> (dx, dgamma, dbeta)
        cache = (x, gamma, mean, inv_std, batch_statistics), as the textbook's forward passes
        make it: batch_norm_train_forward (the batch's own statistics, True) or
        batch_norm_forward (the moving statistics, constants, False)

Cases: TensorFlow's stored results (tests/reference/layers_batchnorm.npz: 'training' on a
(2, 4, 4, 3) input, 'training_2d' on (8, 5), and 'inference'), then central differences in
float64 of the training forward with a random upstream gradient (never ones: with dy = 1
the training dx is 0 whatever the formula, and dgamma = sum(x_hat) = 0).

A wrong result is compared with what the classic mistakes give: the term through the mean
missing, the term through the variance missing, the inference formula in training (the
statistics treated as constants), dgamma as sum(dy) (x_hat left out), the unbiased variance
(m - 1) in its derivative or in x_hat, and the 1 / m left out.
"""
import numpy as np

from ..layers.normalization import batch_norm_backward, batch_norm_forward, batch_norm_train_forward
from . import grader
from .grader import GRADIENT_TOLERANCE, NUMERICAL_TOLERANCE, Wrong

MODEL_ANSWER = 'minixcept.layers.normalization.batch_norm_backward'
EPSILON = 1e-3                                   # Keras's default, as in the fixtures
#: the stored TensorFlow cases: name -> description
TENSORFLOW_CASES = {
    'training': "TensorFlow, training mode, (2, 4, 4, 3) input (m = 32 values per channel)",
    'training_2d': "TensorFlow, training mode, (8, 5) input (m = 8 values per channel)",
    'inference': "TensorFlow, inference mode (moving statistics), (2, 4, 4, 3) input",
}
#: float64 cases for finite differences of the training forward: (input shape, description)
NUMERICAL_CASES = [
    ((3, 2, 2, 4), "finite differences, training mode, (3, 2, 2, 4) input, random dy"),
    ((5, 3), "finite differences, training mode, (5, 3) input (m = 5), random dy"),
]


# -- what the classic mistakes give -------------------------------------------------------

def _pieces(dy, cache):
    x, gamma, mean, inv_std, _ = cache
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    x_hat = (x - mean) * inv_std
    g = dy * gamma                                                     # the gradient of x_hat
    return axes, m, x_hat, g


def mistaken_dx(dy, cache):
    """(mistake, the dx it gives) for a training-mode cache."""
    x = cache[0]
    axes, m, x_hat, g = _pieces(dy, cache)
    inv_std = cache[3]
    mean_g, mean_gx = g.mean(axis=axes), (g * x_hat).mean(axis=axes)
    # x_hat recomputed from the unbiased variance (ddof=1), the rest of the formula right
    inv_std_unbiased = 1.0 / np.sqrt(((x - x.mean(axis=axes)) ** 2).sum(axis=axes) / (m - 1) + EPSILON)
    x_hat_u = (x - x.mean(axis=axes)) * inv_std_unbiased
    return [
        ("leaving out the term through the mean (dx = inv_std * (g - x_hat * mean(g * x_hat)), "
         "g = dy * gamma; the mean depends on every x, so -mean(g) belongs in the bracket)",
         inv_std * (g - x_hat * mean_gx)),
        ("leaving out the term through the variance (dx = inv_std * (g - mean(g)); the variance "
         "depends on every x too, which adds -x_hat * mean(g * x_hat))", inv_std * (g - mean_g)),
        ("the inference formula in training mode (dx = dy * gamma * inv_std treats the batch's "
         "mean and variance as constants, but in training they are computed from x)", g * inv_std),
        ("the unbiased variance, m - 1, in the variance's derivative (Keras 3 normalises with the "
         "biased variance, sum((x - mean)^2) / m, so d var / d x_k = 2 (x_k - mean) / m)",
         inv_std * (g - mean_g - x_hat * (g * x_hat).sum(axis=axes) / (m - 1))),
        ("x_hat recomputed with the unbiased variance, m - 1 (Keras 3 uses the biased one, "
         "whose inv_std is in the cache)", inv_std_unbiased * (g - g.mean(axis=axes)
                                                         - x_hat_u * (g * x_hat_u).mean(axis=axes))),
        ("leaving out the 1 / m (dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma))",
         inv_std * (m * g - m * mean_g - x_hat * m * mean_gx)),
    ]


def mistaken_dgamma(dy, cache):
    axes, m, x_hat, g = _pieces(dy, cache)
    x = cache[0]
    x_hat_u = (x - x.mean(axis=axes)) / np.sqrt(((x - x.mean(axis=axes)) ** 2).sum(axis=axes) / (m - 1) + EPSILON)
    return [("dgamma = sum(dy), leaving out x_hat (y = gamma * x_hat + beta, so dgamma = sum(dy * x_hat))",
             dy.sum(axis=axes)),
            ("x_hat recomputed with the unbiased variance, m - 1 (Keras 3 uses the biased one)",
             (dy * x_hat_u).sum(axis=axes)),
            ("dgamma = sum(dy * x) (gamma multiplies x_hat = (x - mean) * inv_std, not x)",
             (dy * cache[0]).sum(axis=axes))]


def mistaken_inference_dx(dy, cache):
    """At inference the statistics are constants: the training formula is the mistake there."""
    x, gamma, mean, inv_std, _ = cache
    axes, m, x_hat, g = _pieces(dy, cache)
    batch_cache = batch_norm_train_forward(x, gamma, np.zeros_like(gamma), EPSILON)[3]
    return [("the training formula at inference (with the moving statistics, mean and variance are "
             "constants: the cache's last entry is False, and dx = dy * gamma * inv_std)",
             inv_std * (g - g.mean(axis=axes) - x_hat * (g * x_hat).mean(axis=axes))),
            ("the batch's own statistics at inference (the cache holds the moving mean and inv_std, "
             "constants, and dx = dy * gamma * inv_std)", batch_norm_backward(dy, batch_cache)[0])]


def _dx_hint(index, shape):
    return ("per channel, with g = dy * gamma: dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), "
            "the means taken over every axis but the last (m values per channel).")


# -- the check -----------------------------------------------------------------------------

def _compare_all(result, expected, dy, cache, tolerance, reference):
    dx, dgamma, dbeta = grader.parts(result, ('dx', 'dgamma', 'dbeta'))
    channels = cache[0].shape[-1]
    for name, value in (('dgamma', dgamma), ('dbeta', dbeta)):
        shape = np.shape(value)
        if value is not None and shape != (channels,):
            raise Wrong(f"{name} has shape {shape}, expected ({channels},): sum over every axis but "
                        f"the last (the channels).")
    layout = 'NHWC' if dy.ndim == 4 else 'NC'
    dx_mistakes = mistaken_dx(dy, cache) if cache[4] else mistaken_inference_dx(dy, cache)
    grader.compare('dx', dx, expected[0], tolerance, layout=layout, mistakes=dx_mistakes,
                   hint=_dx_hint, reference=reference)
    grader.compare('dgamma', dgamma, expected[1], tolerance, layout='C', mistakes=mistaken_dgamma(dy, cache),
                   hint=lambda index, shape: "dgamma[c] = sum of dy * x_hat over channel c.",
                   reference=reference)
    grader.compare('dbeta', dbeta, expected[2], tolerance, layout='C',
                   hint=lambda index, shape: "dbeta[c] = sum of dy over channel c.", reference=reference)


def check_batch_norm_backward(batch_norm_backward_fn):
    """Grade ``batch_norm_backward(dy, cache) -> (dx, dgamma, dbeta)``,
    cache = (x, gamma, mean, inv_std, batch_statistics)."""
    cases = []
    for name, description in TENSORFLOW_CASES.items():
        def run(name=name):
            inputs, outputs = grader.fixture('layers_batchnorm', name)
            x, gamma, beta, moving_mean, moving_variance, dy = (
                inputs[key].astype(np.float64) for key in ('x', 'w0', 'w1', 'w2', 'w3', 'dy'))
            if name == 'inference':
                cache = batch_norm_forward(x, gamma, beta, moving_mean, moving_variance, EPSILON)[1]
            else:
                cache = batch_norm_train_forward(x, gamma, beta, EPSILON)[3]
            result = grader.call(batch_norm_backward_fn, dy, cache)
            _compare_all(result, (outputs['dx'], outputs['dw0'], outputs['dw1']), dy, cache,
                         GRADIENT_TOLERANCE, 'TensorFlow')
        cases.append((description, run))

    for seed, (shape, description) in enumerate(NUMERICAL_CASES):
        def run(seed=seed, shape=shape):
            x, dy = grader.random_case(seed, shape, shape)
            x = 1.5 * x + 0.5                                          # a mean and a spread of its own
            rng = np.random.default_rng(50 + seed)
            gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), 0.3 * rng.standard_normal(shape[-1])
            forward = lambda: batch_norm_train_forward(x, gamma, beta, EPSILON)[0]   # noqa: E731
            expected = [grader.numerical(forward, array, dy) for array in (x, gamma, beta)]
            cache = batch_norm_train_forward(x, gamma, beta, EPSILON)[3]
            _compare_all(grader.call(batch_norm_backward_fn, dy, cache), expected, dy, cache,
                         NUMERICAL_TOLERANCE, 'finite differences')
        cases.append((description, run))
    return grader.grade('batch-norm backward', cases, MODEL_ANSWER)


# The model answer, for the tests and the tour: the textbook's own function.
model_answers = {check_batch_norm_backward: batch_norm_backward}
