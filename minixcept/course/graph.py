"""Exercises on the Xception graph: the fan-out sum and the cost of a middle block (tour chapter 5).

1. The fan-out sum. A residual unit in which one tensor is read twice, as in Xception's
   blocks 3-13 (the main branch reads relu(x), the shortcut reads the pre-ReLU x)::

       y = pointwise(relu(x), W_main) + pointwise(x, W_short)

   The learner writes its backward pass,

       residual_unit_backward(dy, cache) -> (dx, dW_main, dW_short)

   where cache is what ``residual_unit_forward(x, W_main, W_short) -> (y, cache)`` below
   returns: ``(positive, main_cache, short_cache)``, the caches of the textbook's
   ``relu_forward`` and of its two ``pointwise_conv2d_forward`` calls (main_cache =
   (relu(x), W_main), short_cache = (x, W_short)). The model answer, below, is four
   textbook calls and one ``+``; in the real network the ``+`` is the line of
   ``Model.backward`` in ``minixcept/model.py`` that adds the gradients coming back to a
   tensor read by two layers.

   Cases: central differences in float64 with a random dy, the inputs kept away from
   ReLU's kink at 0 (no exact zeros, so the derivative is defined and the differences do
   not straddle it). A wrong result is compared with what the classic mistakes give: dx
   from one reader only (either one: the second share overwrote the first, or was never
   added), ReLU's derivative left out, and the shortcut reading relu(x) (what an
   in-place ReLU leaves it to read). Passing the learner's own forward as well checks
   that it leaves x untouched: a ReLU in place destroys the tensor the shortcut reads.

2. The cost of a middle block: ``middle_block_parameters(width) -> int``, the parameters of
   one middle-flow block of ``width`` channels (3 x: a 3x3 separable convolution without
   bias, then batch-norm; ReLUs have none). Graded against Keras's own counts:
   tests/reference/explain_costs.npz ('network/deeper', 16 middle blocks, minus
   'network/built', 8: eight blocks of 728) and network_counts.npz (12 blocks minus 8:
   four of 728). Keras counted one other width, 1024 ('network/wider'), but there block 4
   widens to 1024 and block 13 starts from it, so wider minus built is eight middle
   blocks' growth plus those two blocks' growth: the grader writes the latter out (it is
   ``_edge_parameters`` below) and derives the 1024-wide block from what remains. That case
   therefore rests on Keras's total and on the grader's count of blocks 4 and 13; the 728
   cases rest on Keras alone.
"""
import numbers

import numpy as np

from ..layers.activation import relu_backward, relu_forward
from ..layers.pointwise import pointwise_conv2d_backward, pointwise_conv2d_forward
from . import grader
from .grader import NUMERICAL_TOLERANCE, Wrong

MODEL_ANSWER = 'minixcept.course.graph.residual_unit_backward (the + is Model.backward\'s, minixcept/model.py)'

#: float64 cases: (x shape, output channels, description)
FAN_OUT_CASES = [
    ((2, 4, 5, 3), 4, "finite differences, 2 images 4x5, 3 -> 4 channels, random dy"),
    ((1, 3, 3, 5), 2, "finite differences, 1 image 3x3, 5 -> 2 channels, random dy"),
    ((1, 6, 2, 2), 3, "finite differences, 1 image 6x2, 2 -> 3 channels, most of x negative"),
]


# -- the model answer: textbook functions, composed ------------------------------------------

def residual_unit_forward(x, W_main, W_short):
    """y = pointwise(relu(x), W_main) + pointwise(x, W_short); cache = (positive, main_cache, short_cache).

    relu_forward returns a new array, so the shortcut still reads the pre-ReLU x."""
    a, positive = relu_forward(x)
    y_main, main_cache = pointwise_conv2d_forward(a, W_main)
    y_short, short_cache = pointwise_conv2d_forward(x, W_short)
    return y_main + y_short, (positive, main_cache, short_cache)


def residual_unit_backward(dy, cache):
    """(dx, dW_main, dW_short): the add hands dy to both branches; each branch sends back
    its share to x; x is read twice, so its gradient is the sum of the two shares."""
    positive, main_cache, short_cache = cache
    da, dW_main, _ = pointwise_conv2d_backward(dy, main_cache)       # main branch, back to relu(x)
    dx_main = relu_backward(da, positive)                              # ... and through the ReLU to x
    dx_short, dW_short, _ = pointwise_conv2d_backward(dy, short_cache)  # the shortcut, straight to x
    return dx_main + dx_short, dW_main, dW_short                       # fan-out: the shares add


# -- what the classic mistakes give -------------------------------------------------------------

def _fan_out_mistakes(dy, cache):
    positive, (a, W_main), (x, W_short) = cache
    da, _, _ = pointwise_conv2d_backward(dy, (a, W_main))
    dx_main = relu_backward(da, positive)
    dx_short, _, _ = pointwise_conv2d_backward(dy, (x, W_short))
    dx_short_from_a, dW_short_from_a, _ = pointwise_conv2d_backward(dy, (a, W_short))
    dx = [
        ("dx from the main branch only: the shortcut's share was never added (x is read by two "
         "layers, so dx = dx_main + dx_short)", dx_main),
        ("dx from the shortcut only: its share overwrote the main branch's (= where += belongs; "
         "x is read by two layers, so dx = dx_main + dx_short)", dx_short),
        ("the ReLU's derivative left out: the main branch's share must be masked by x > 0 "
         "before it is added", da + dx_short),
        ("a shortcut that reads relu(x), as after an in-place ReLU: both shares then pass the "
         "ReLU mask, but the shortcut reads the pre-ReLU x, so only the main share is masked",
         relu_backward(da + dx_short_from_a, positive)),
    ]
    dW_short = [
        ("dW_short from relu(x): the shortcut reads the pre-ReLU x (an in-place ReLU would have "
         "destroyed it), so dW_short = x^T dy", dW_short_from_a),
    ]
    return dx, dW_short


def _fan_out_hint(index, shape):
    return ("the gradient of x is the sum of what its two readers send back: relu_backward of the "
            "main branch's dx, plus the shortcut's dx; each weight gradient is its own input^T dy.")


def _unit_inputs(seed, shape, c_out):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x = np.where(np.abs(x) < 0.05, np.sign(x + 1e-12) * (0.05 + np.abs(x)), x)   # away from the kink
    if 'negative' in FAN_OUT_CASES[seed][2]:
        x = -np.abs(x)
        x.flat[::3] *= -1                                        # a third positive
    W_main = rng.standard_normal((1, 1, shape[-1], c_out))
    W_short = rng.standard_normal((1, 1, shape[-1], c_out))
    dy = rng.standard_normal(shape[:3] + (c_out,))
    return x, W_main, W_short, dy


def check_fan_out_backward(residual_unit_backward, residual_unit_forward=None):
    """Grade ``residual_unit_backward(dy, cache) -> (dx, dW_main, dW_short)`` on the unit
    y = pointwise(relu(x), W_main) + pointwise(x, W_short).

    cache comes from this module's ``residual_unit_forward`` unless the learner's own forward
    (same signature) is passed; then the check also makes sure it leaves x as it found it.
    """
    own_forward = residual_unit_forward is not None
    forward = residual_unit_forward if own_forward else globals()['residual_unit_forward']

    cases = []
    for seed, (shape, c_out, description) in enumerate(FAN_OUT_CASES):
        def run(seed=seed, shape=shape, c_out=c_out):
            x, W_main, W_short, dy = _unit_inputs(seed, shape, c_out)
            x_before = x.copy()
            _, cache = grader.parts(grader.call(forward, x, W_main, W_short), ('y', 'cache'))
            if own_forward and not np.array_equal(x, x_before):
                changed = tuple(int(i) for i in np.argwhere(x != x_before)[0])
                raise Wrong(f"your forward changed its input x in place: x{list(changed)} was "
                            f"{x_before[changed]:.6g} and is {x[changed]:.6g} afterwards. A ReLU in place "
                            "destroys the pre-ReLU x that the shortcut reads: make relu return a new array.")
            got = grader.parts(grader.call(residual_unit_backward, dy, cache), ('dx', 'dW_main', 'dW_short'))

            f = lambda: globals()['residual_unit_forward'](x, W_main, W_short)[0]  # noqa: E731
            want = {name: grader.numerical(f, array, dy)             # each perturbed in place, in turn
                    for name, array in (('dx', x), ('dW_main', W_main), ('dW_short', W_short))}
            _, textbook_cache = globals()['residual_unit_forward'](x, W_main, W_short)
            dx_mistakes, dW_short_mistakes = _fan_out_mistakes(dy, textbook_cache)
            reference = 'finite differences'
            grader.compare('dx', got[0], want['dx'], NUMERICAL_TOLERANCE, mistakes=dx_mistakes,
                           hint=_fan_out_hint, reference=reference)
            grader.compare('dW_main', got[1], want['dW_main'], NUMERICAL_TOLERANCE, layout='HWCK',
                           mistakes=[("dW_main from the pre-ReLU x: the main branch's pointwise reads "
                                      "relu(x)", pointwise_conv2d_backward(dy, (x, W_main))[1])],
                           reference=reference)
            grader.compare('dW_short', got[2], want['dW_short'], NUMERICAL_TOLERANCE, layout='HWCK',
                           mistakes=dW_short_mistakes, reference=reference)
        cases.append((description, run))
    answer = MODEL_ANSWER if not own_forward else \
        'minixcept.course.graph.residual_unit_forward and ' + MODEL_ANSWER
    return grader.grade('fan-out backward', cases, answer)


# -- the cost of a middle block -------------------------------------------------------------------

def middle_block_parameters(width):
    """Parameters of one middle-flow block of ``width`` channels: three steps of a 3x3
    separable convolution without bias (depthwise 3*3*w, pointwise w*w) and a batch-norm
    (gamma, beta, moving mean, moving variance: 4*w); the ReLUs have none:
    3 * (9w + w^2 + 4w) = 3w^2 + 39w (1,618,344 at w = 728)."""
    return 3 * (3 * 3 * width + width * width + 4 * width)


def _edge_parameters(width):
    """Parameters of blocks 4 and 13 that depend on the middle width w (the rest of both
    blocks is fixed): block 4 (256 -> w): separable 256 -> w (9*256 + 256*w), BN 4w,
    separable w -> w (9w + w^2), BN 4w, shortcut 1x1 256 -> w, BN 4w; block 13 (w -> 1024):
    separable w -> w (9w + w^2), BN 4w, separable w -> 1024 (9w + 1024w), shortcut 1x1
    w -> 1024 (the BNs of 1024 channels do not depend on w)."""
    w = width
    block4 = 9 * 256 + 256 * w + 4 * w + 9 * w + w * w + 4 * w + 256 * w + 4 * w
    block13 = 9 * w + w * w + 4 * w + 9 * w + 1024 * w + 1024 * w
    return block4 + block13


def keras_middle_block_counts():
    """{width: (parameters of one middle block, how it was derived)} from Keras's counts."""
    with np.load(grader.REFERENCE_DIR / 'explain_costs.npz') as costs, \
            np.load(grader.REFERENCE_DIR / 'network_counts.npz') as counts:
        built, deeper, wider = (int(costs[f'network/{name}']) for name in ('built', 'deeper', 'wider'))
        twelve, notop = int(counts['params_middle12_notop']), int(counts['params_notop'])
    at_728 = (deeper - built) // 8
    at_1024 = at_728 + ((wider - built) - (_edge_parameters(1024) - _edge_parameters(728))) // 8
    return {
        728: [(at_728, f"Keras: (16 middle blocks: {deeper:,} - 8 blocks: {built:,}) / 8"),
              ((twelve - notop) // 4, f"Keras: (12 middle blocks: {twelve:,} - 8 blocks: {notop:,}) / 4")],
        1024: [(at_1024, f"Keras's width-1024 total {wider:,} minus the 728-wide {built:,}, minus the "
                         f"growth of blocks 4 and 13 (written out in the grader), over 8, plus the 728-wide block")],
    }


def _block_mistakes(width):
    w = width
    return [
        ("leaving the batch-norms out (4 numbers per channel each: gamma, beta, moving mean, "
         "moving variance)", 3 * (9 * w + w * w)),
        ("counting only gamma and beta: count_params counts the moving mean and variance too "
         "(non-trainable, but parameters)", 3 * (9 * w + w * w + 2 * w)),
        ("a full 3x3 convolution's 9w^2 where the separable one has 9w (depthwise) + w^2 (pointwise)",
         3 * (9 * w * w + 4 * w)),
        ("a bias in each separable convolution (Xception's have none: use_bias=False)",
         3 * (9 * w + w * w + 4 * w + w)),
        ("one separable conv and batch-norm where the block has three", 9 * w + w * w + 4 * w),
    ]


def check_middle_block_parameters(middle_block_parameters):
    """Grade ``middle_block_parameters(width) -> int`` against Keras's counts (728, 1024)."""
    cases = []
    for width, derivations in keras_middle_block_counts().items():
        for want, how in derivations:
            def run(width=width, want=want):
                got = grader.call(middle_block_parameters, width)
                if isinstance(got, (bool, np.bool_)) or not isinstance(got, (numbers.Integral, numbers.Real)):
                    raise Wrong(f"width {width}: expected a whole number, got {got!r}.")
                if isinstance(got, numbers.Real) and not float(got).is_integer():
                    raise Wrong(f"width {width}: {got!r} is not a whole number of parameters.")
                if int(got) == want:
                    return
                message = f"width {width}: {int(got):,} parameters where Keras counts {want:,} (off by {int(got) - want:+,})."
                for description, wrong in _block_mistakes(width):
                    if int(got) == wrong:
                        raise Wrong(f"{message}\nYour count is exactly what {description} gives.")
                raise Wrong(f"{message}\nHint: a middle block is three times (ReLU: 0; SeparableConv2D "
                            f"3x3 {width} -> {width}, no bias; BatchNormalization of {width} channels).")
            cases.append((f"width {width}, {how}", run))
    return grader.grade('middle block parameters', cases, 'minixcept.course.graph.middle_block_parameters')


# The model answers, for the tests and the tour.
model_answers = {check_fan_out_backward: residual_unit_backward,
                 check_middle_block_parameters: middle_block_parameters}
