"""Seeing inside: which part of a photo made the verdict, and which pixels it hangs on.

Both pictures are gradients of one number, the class score s, taken by minixcept's own
backward pass through the head and the network. s is the logit of the class; a one-logit
head (cat vs dog) has s = z for class 1 and s = -z for class 0, each class's log-odds.

Grad-CAM (Selvaraju et al., 2017), at a named activation A of shape (h, w, K):

    alpha_k  = mean over (i, j) of ds/dA[i, j, k]    how much channel k pushes s up
    map[i,j] = ReLU(sum_k alpha_k A[i, j, k])        where the channels that push s up fire

The ReLU keeps the evidence for the class and drops the evidence against it. The last
convolutional activation (block14, 10 x 10 at 299 px) has the most class-specific channels
and the coarsest grid; an earlier one (block13, block4_pool) gives a finer, noisier map.

Saliency (Simonyan et al., 2014) is ds/dx for the input pixels x. One such gradient is
speckled: every ReLU switches its pixels' paths on or off, so a tiny change of x changes
it a lot. SmoothGrad (Smilkov et al., 2017) averages it over N copies of x with Gaussian
noise of standard deviation ``noise * (max x - min x)`` added; what survives the average
is what the score depends on robustly.

Fan-out. A tensor read by two layers (a middle-flow block's output feeds the next block's
ReLU and its residual add) gets a gradient from each reader, and ds/dA is their sum; one
reader's share alone would give a different, wrong map. ``Model.backward(stop_at=R)``
returns the gradient of R's input once every reader of that tensor has added its share, so
``gradient_at`` stops at a layer that reads A.
"""
import numpy as np

from .. import backend, checks
from ..errors import ShapeError
from ..layers.base import no_grad
from ..losses import BinaryCrossentropy
from .fit import predicted_classes


# -- the class score -----------------------------------------------------------------------

#: What tells ``fit.predicted_classes`` that the head's outputs are logits (one logit: class 1
#: when z > 0); it reads only ``from_logits``, so the same loss serves K logits (an argmax).
_FROM_LOGITS = BinaryCrossentropy(from_logits=True)


def _predicted(logits):
    """(N, K) head logits -> (N,) the most probable class as a NumPy array, as ``fit`` scores it."""
    return backend.asnumpy(predicted_classes(logits, _FROM_LOGITS))


def class_scores(logits, classes):
    """(N, K) logits and (N,) classes -> (N,) scores s and ds/dlogits (N, K).

    K = 1: s = z for class 1 and -z for class 0 (so ds/dz = +1 or -1); K > 1: s = z[class].
    """
    checks.array(logits, 'logits', 'class_scores', rank=2)
    classes = _class_indices(classes, len(logits), 'classes')
    xp = backend.get_array_module(logits)
    count = max(logits.shape[1], 2)                # one logit: two classes
    if classes.min(initial=0) < 0 or classes.max(initial=0) >= count:
        raise ValueError(f"class_index (classes) must lie in 0..{count - 1} for a head with {logits.shape[1]} "
                         f"logit(s), got {sorted(set(classes.tolist()))}")
    rows = np.arange(len(classes))
    dlogits = np.zeros(logits.shape, dtype=logits.dtype)
    if logits.shape[1] == 1:
        dlogits[:, 0] = np.where(classes == 1, 1.0, -1.0)
    else:
        dlogits[rows, classes] = 1.0
    dlogits = xp.asarray(dlogits)
    scores = (logits * dlogits).sum(axis=1)
    return backend.asnumpy(scores), dlogits


def _classes(class_index, logits):
    """class_index as an (N,) array: one int for all images, one per image, or (None) predicted."""
    if class_index is None:
        return _predicted(logits)
    return _class_indices(class_index, len(logits), 'class_index')


def _class_indices(value, count, name):
    """One whole number, or ``count`` of them, as an (count,) int64 array; TypeError / ShapeError
    naming ``name`` otherwise (the range is checked against the head's logits)."""
    indices = backend.asnumpy(checks.numbers_array(value, name, 'explain'))
    if indices.dtype.kind not in 'iu':
        raise TypeError(f"explain: {name} must be whole numbers (class indices), got {value!r}")
    if indices.ndim > 1 or indices.size not in (1, count):
        raise ShapeError(f"explain: {name} must be one class index or one per image ({count}), got shape "
                         f"{tuple(indices.shape)}")
    return np.broadcast_to(indices.astype(np.int64).reshape(-1), (count,))


def _check_models(model, head, who):
    for name, value in (('model', model), ('head', head)):
        if not (hasattr(value, 'forward') and hasattr(value, 'backward')):
            raise TypeError(f"{who}: {name} must be a Model (or a runner with forward and backward), "
                            f"got {type(value).__name__}")


# -- the gradient at any named tensor -------------------------------------------------------

def _reader_of(model, name):
    """The name of a layer whose (first) input is the tensor ``name``; None for the model's output."""
    model.get_layer(name)                                   # KeyError naming the model if there is none
    if name == model.layers[-1].name:
        return None
    for node in model.nodes:
        if node.inputs[0] == name:
            return node.layer.name
    raise ValueError(f"model {model.name!r}: no layer reads {name!r} as its first input, so no "
                     f"backward walk stops there (is it a layer of this model?)")


def gradient_at(model, head, x, layer=None, class_index=None):
    """The class score of each image and its gradient at a named layer's output.

    model: a Model (or a runner offering forward/backward) from images (N, H, W, C) to what
        the head reads; head: a Model from that to logits (N, K); x: model inputs (already
        preprocessed); layer: the name of a layer of ``model``, or None for the input x
        itself (a runner supports only None); class_index: None for each image's predicted
        class, one int for all, or one per image.
    Returns (scores (N,), classes (N,), activation, gradient), the last two of that layer's
    output shape (x itself for layer=None), on the current backend. Batch-norm and
    dropout run in inference mode; the backward pass stops as soon as the gradient is whole.
    """
    _check_models(model, head, 'gradient_at')
    checks.optional_name(layer, 'layer', 'gradient_at')
    reader = None if layer is None else _reader_of(model, layer)
    if layer is None:
        features, activation = model.forward(x), x
    else:
        features, captured = model.forward(x, capture=[layer])
        activation = captured[layer]
    logits = head.forward(features)
    classes = _classes(class_index, logits)
    scores, dlogits = class_scores(logits, classes)
    dfeatures = head.backward(dlogits)
    if layer is not None and reader is None:                 # the layer is the model's output
        return scores, classes, activation, dfeatures
    return scores, classes, activation, model.backward(dfeatures, stop_at=reader)


# -- the two pictures ----------------------------------------------------------------------

def grad_cam(model, head, x, layer='block14_sepconv2_act', class_index=None):
    """Grad-CAM heat maps (N, h, w) at ``layer`` (its spatial size), >= 0, not normalised.

    Arguments as ``gradient_at``; the map explains ``class_index`` (default: the predicted class).
    """
    _, _, activation, gradient = gradient_at(model, head, x, layer, class_index)
    if activation.ndim != 4:
        raise ValueError(f"Grad-CAM needs a layer with a (N, h, w, channels) output; "
                         f"{layer!r} gives shape {tuple(activation.shape)}")
    return cam_from(activation, gradient)


def cam_from(activation, gradient):
    """The Grad-CAM map (N, h, w) from an activation (N, h, w, K) and the score's gradient there."""
    checks.array(activation, 'activation', 'cam_from', rank=4)
    checks.array(gradient, 'gradient', 'cam_from')
    checks.shape(gradient, activation.shape, 'gradient (the shape of activation)', 'cam_from')
    xp = backend.get_array_module(activation)
    channel_weights = gradient.mean(axis=(1, 2), keepdims=True)         # alpha: (N, 1, 1, K)
    cam = xp.maximum((channel_weights * activation).sum(axis=3), 0)     # (N, h, w)
    return backend.asnumpy(cam)


def noisy_copy(x, noise, rng):
    """x plus Gaussian noise of standard deviation noise * (max - min of each image)."""
    checks.array(x, 'x', 'noisy_copy')
    checks.number(noise, 'noise', 'noisy_copy', 0)
    if not hasattr(rng, 'standard_normal'):
        raise TypeError(f"noisy_copy: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    xp = backend.get_array_module(x)
    axes = tuple(range(1, x.ndim))
    spread = x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)
    draw = xp.asarray(rng.standard_normal(x.shape)).astype(x.dtype)
    return x + noise * spread * draw


def saliency(model, head, x, samples=8, noise=0.15, seed=0, class_index=None, progress=None):
    """SmoothGrad: ds/dx averaged over ``samples`` noisy copies of x (noise=0: one plain gradient).

    model may be a Model or a runner (minixcept.engines.training.GradientEngine).
    The class is chosen once, on the clean images, so every copy explains the same class.
    Noisy copy i of the batch is ``noisy_copy(x, noise, rng)`` for the i-th draw of
    ``numpy.random.default_rng(seed)``. progress(done, samples) is called after each copy.
    Returns the averaged gradient (N, H, W, C) as a NumPy array; ``saliency_image`` makes it a picture.
    """
    _check_models(model, head, 'saliency')
    checks.integer(samples, 'samples', 'saliency', minimum=1)
    checks.number(noise, 'noise', 'saliency', 0)
    checks.integer(seed, 'seed', 'saliency', minimum=0)
    if progress is not None and not callable(progress):
        raise TypeError(f"saliency: progress must be a function (done, samples) or None, got {type(progress).__name__}")
    if class_index is None:
        with no_grad():
            class_index = _predicted(head.forward(model.forward(x)))
    rng = np.random.default_rng(seed)
    copies = samples if noise else 1
    total = None
    for done in range(1, copies + 1):
        x_noisy = noisy_copy(x, noise, rng) if noise else x
        _, _, _, gradient = gradient_at(model, head, x_noisy, None, class_index)
        total = gradient if total is None else total + gradient
        if progress is not None:
            progress(done, copies)
    return backend.asnumpy(total / copies)


def saliency_image(gradient, percentile=99):
    """(N, H, W, C) gradient -> (N, H, W) in [0, 1]: the largest |gradient| over the channels,
    scaled so that each image's ``percentile``-th value is 1 (a few extreme pixels would
    otherwise leave the rest black)."""
    gradient = checks.array(backend.asnumpy(checks.array(gradient, 'gradient', 'saliency_image')),
                            'gradient', 'saliency_image', rank=4)
    checks.number(percentile, 'percentile', 'saliency_image', 0, 100, low_open=True)
    magnitude = np.abs(np.asarray(gradient)).max(axis=3)
    top = np.percentile(magnitude.reshape(len(magnitude), -1), percentile, axis=1)
    return np.clip(magnitude / np.maximum(top, 1e-30)[:, None, None], 0, 1)
