"""TensorFlow references for the course's Grad-CAM exercise (minixcept/course/explain.py).

    python tests/reference/generate.py course_explain      # rewrites course_explain.npz

The learner writes the Grad-CAM map from an activation A (N, h, w, K) and the class score's
gradient there. explain_gradcam.npz (make_explain.py) stores TensorFlow's maps but only a
32-channel slice of each gradient and no activation, so this script stores, for the same
cat and dog at 128 px through Xception (ImageNet notop weights, float64) and the same
random-weight head, the whole of block14_sepconv2_act (2, 4, 4, 2048) and its gradient, as
GradientTape gives them:

    activation          A, rounded to float32 (the file stays small)
    gradient            ds/dA for each photo's predicted class (s = z for class 1, -z for class 0),
                        rounded to float32; the gradient for the other class is exactly its negation
    classes             each photo's predicted class
    cam                 TensorFlow's map ReLU(sum_k mean_ij(ds/dA) A) from the stored (rounded)
                        arrays, for the predicted class: explain_gradcam.npz's cam to rounding
    cam_other           the same for the other class (-gradient): where the evidence against lies

This module never imports minixcept: a reference must not come from the code it checks.
"""
from pathlib import Path

import numpy as np

import make_explain as explain
import make_network as network

LAYER = 'block14_sepconv2_act'


def tensorflow_cam(activation, gradient):
    """Grad-CAM in TensorFlow ops, in float64: ReLU(sum_k alpha_k A), alpha_k = mean over the grid."""
    import tensorflow as tf
    a, g = tf.constant(activation, tf.float64), tf.constant(gradient, tf.float64)
    alpha = tf.reduce_mean(g, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(alpha * a, axis=3)).numpy()


def keras_block14(catdog=network.CATDOG, weights=network.NOTOP_WEIGHTS):
    """(classes, activation, gradient, gradient for the other class) at LAYER, from Keras, float64."""
    import keras
    images = network.load_photos(catdog, explain.SIDE)
    x = keras.applications.xception.preprocess_input(images.astype(np.float32)).astype(np.float64)
    base = network.keras_xception((explain.SIDE, explain.SIDE, 3), weights, dtype='float64')
    head = explain.keras_head(explain.head_weights(base.output.shape[-1]))
    classes, results, _ = explain.keras_explanations(base, head, x, (LAYER,))
    _, other, _ = explain.keras_explanations(base, head, x, (LAYER,), classes=1 - classes)
    activation, gradient, _ = results[LAYER]
    return classes, activation, gradient, other[LAYER][1]


def arrays_from(classes, activation, gradient):
    activation, gradient = activation.astype(np.float32), gradient.astype(np.float32)
    a, g = activation.astype(np.float64), gradient.astype(np.float64)
    return {'classes': classes, 'activation': activation, 'gradient': gradient,
            'cam': tensorflow_cam(a, g), 'cam_other': tensorflow_cam(a, -g)}


def make(out_dir):
    if not network.NOTOP_WEIGHTS.exists():
        raise SystemExit(f'{network.NOTOP_WEIGHTS.name} is missing: run python weights/fetch.py first')
    classes, activation, gradient, gradient_other = keras_block14()
    if not np.array_equal(gradient_other, -gradient):
        raise SystemExit('the other class\'s gradient is not the negation of the predicted class\'s')
    np.savez_compressed(Path(out_dir) / 'course_explain.npz', **arrays_from(classes, activation, gradient))
