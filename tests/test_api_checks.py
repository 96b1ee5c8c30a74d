"""Every public entry point checks its arguments at the door.

One table: for each public function and each of its arguments, a wrong type, a value out
of range and (for arrays) a wrong shape, each expecting a typed error - TypeError,
ValueError or ShapeError - whose message names the argument (and the layer or function).
A case that ran on instead would end deep in NumPy, or worse, give a wrong answer.
"""
from dataclasses import dataclass

import numpy as np
import pytest

import minixcept
from minixcept import gradcheck, layers, losses, optimizers
from minixcept.errors import ShapeError
from minixcept.workflows import compare as compare_module
from minixcept.workflows import explain


def floats(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def tiny_model():
    minixcept.set_seed(0)
    return minixcept.Sequential([layers.Conv2D(4, 3, name='conv'), layers.BatchNormalization(name='bn'),
                                 layers.ReLU(name='relu'), layers.GlobalAveragePooling2D(name='pool')],
                                input_shape=(8, 8, 3), name='tiny')


def tiny_head(units=1):
    minixcept.set_seed(1)
    return minixcept.Sequential([layers.Dense(units, name='logits')], input_shape=(4,), name='head')


def conv_run():
    """A built Conv2D that has run one forward pass (2, 6, 6, 4) with gradients kept."""
    conv = layers.Conv2D(4, 3, name='conv_probe')
    conv.forward(floats(2, 8, 8, 3))
    return conv


def model_run():
    model = tiny_model()
    model.forward(floats(2, 8, 8, 3))
    return model


def loss_run(loss, pred, y):
    loss.forward(pred, y)
    return loss


def dense_with_grad(grad_shape):
    dense = layers.Dense(2, name='dense_probe')
    dense.build((None, 3))
    dense.grads = {'kernel': np.ones(grad_shape, np.float32), 'bias': np.ones(2, np.float32)}
    return dense


def compare_pair():
    """A Pair that needs no TensorFlow: only the checks at compare's door run."""
    return compare_module.Pair(base=tiny_model(), head=None, keras_base=None, keras_head=[], input_shape=(8, 8, 3))


@dataclass
class Case:
    id: str
    call: object            # a function of no arguments that must raise
    error: type
    names: str              # a regular expression the message must match: the argument, the layer


def cases():
    x = floats(2, 8, 8, 3)
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    return [
        # -- Xception ------------------------------------------------------------------------
        Case('Xception input_shape floats', lambda: minixcept.Xception(input_shape=(71.0, 71.0, 3.0)), TypeError, 'input_shape'),
        Case('Xception input_shape strings', lambda: minixcept.Xception(input_shape=('71', '71', 3)), TypeError, 'input_shape'),
        Case('Xception input_shape not a tuple', lambda: minixcept.Xception(input_shape=71), TypeError, 'input_shape'),
        Case('Xception input_shape too small', lambda: minixcept.Xception(input_shape=(70, 71, 3)), ShapeError, 'input_shape'),
        Case('Xception input_shape 4 channels', lambda: minixcept.Xception(input_shape=(71, 71, 4)), ShapeError, 'input_shape'),
        Case('Xception input_shape rank 2', lambda: minixcept.Xception(input_shape=(71, 71)), ShapeError, 'input_shape'),
        Case('Xception weights True', lambda: minixcept.Xception(weights=True), TypeError, 'weights'),
        Case('Xception weights a number', lambda: minixcept.Xception(weights=3), TypeError, 'weights'),
        Case('Xception include_top string', lambda: minixcept.Xception(include_top='no'), TypeError, 'include_top'),
        Case('Xception classes 0', lambda: minixcept.Xception(classes=0), ValueError, 'classes'),
        Case('Xception classes float', lambda: minixcept.Xception(classes=2.0), TypeError, 'classes'),
        Case('Xception classes imagenet not 1000', lambda: minixcept.Xception(weights='imagenet', classes=2), ValueError, 'classes'),
        Case('Xception middle_blocks -2', lambda: minixcept.Xception(middle_blocks=-2), ValueError, 'middle_blocks'),
        Case('Xception middle_blocks string', lambda: minixcept.Xception(middle_blocks='8'), TypeError, 'middle_blocks'),
        Case('Xception middle_width 0', lambda: minixcept.Xception(middle_width=0), ValueError, 'middle_width'),
        Case('Xception middle_width float', lambda: minixcept.Xception(middle_width=728.0), TypeError, 'middle_width'),
        Case('Xception pooling mean', lambda: minixcept.Xception(include_top=False, pooling='mean'), ValueError, 'pooling'),
        Case('Xception pooling True', lambda: minixcept.Xception(include_top=False, pooling=True), ValueError, 'pooling'),
        Case('Xception name', lambda: minixcept.Xception(name=3), TypeError, 'name'),
        Case('preprocess_input strings', lambda: minixcept.preprocess_input(['a', 'b']), TypeError, 'images'),
        Case('preprocess_input objects', lambda: minixcept.preprocess_input(np.array([object()])), TypeError, 'images'),
        # -- layer constructors ----------------------------------------------------------------
        Case('Conv2D filters 0', lambda: layers.Conv2D(0, 3), ValueError, 'filters'),
        Case('Conv2D filters float', lambda: layers.Conv2D(2.5, 3), TypeError, 'filters'),
        Case('Conv2D kernel_size 0', lambda: layers.Conv2D(2, 0), ValueError, 'kernel_size'),
        Case('Conv2D kernel_size float', lambda: layers.Conv2D(2, 3.0), TypeError, 'kernel_size'),
        Case('Conv2D kernel_size triple', lambda: layers.Conv2D(2, (3, 3, 3)), ValueError, 'kernel_size'),
        Case('Conv2D strides -1', lambda: layers.Conv2D(2, 3, strides=-1), ValueError, 'strides'),
        Case('Conv2D padding full', lambda: layers.Conv2D(2, 3, padding='full'), ValueError, 'padding'),
        Case('Conv2D padding number', lambda: layers.Conv2D(2, 3, padding=1), TypeError, 'padding'),
        Case('Conv2D use_bias string', lambda: layers.Conv2D(2, 3, use_bias='yes'), TypeError, 'use_bias'),
        Case('DepthwiseConv2D kernel_size string', lambda: layers.DepthwiseConv2D('3'), TypeError, 'kernel_size'),
        Case('DepthwiseConv2D strides 0', lambda: layers.DepthwiseConv2D(3, strides=0), ValueError, 'strides'),
        Case('DepthwiseConv2D use_bias None', lambda: layers.DepthwiseConv2D(3, use_bias=None), TypeError, 'use_bias'),
        Case('PointwiseConv2D filters -4', lambda: layers.PointwiseConv2D(-4), ValueError, 'filters'),
        Case('PointwiseConv2D use_bias 1', lambda: layers.PointwiseConv2D(4, use_bias=1), TypeError, 'use_bias'),
        Case('SeparableConv2D filters None', lambda: layers.SeparableConv2D(None, 3), TypeError, 'filters'),
        Case('SeparableConv2D kernel_size 0', lambda: layers.SeparableConv2D(4, (3, 0)), ValueError, 'kernel_size'),
        Case('BatchNormalization epsilon 0', lambda: layers.BatchNormalization(epsilon=0), ValueError, 'epsilon'),
        Case('BatchNormalization epsilon nan', lambda: layers.BatchNormalization(epsilon=float('nan')), ValueError, 'epsilon'),
        Case('BatchNormalization momentum 1.5', lambda: layers.BatchNormalization(momentum=1.5), ValueError, 'momentum'),
        Case('BatchNormalization momentum string', lambda: layers.BatchNormalization(momentum='0.99'), TypeError, 'momentum'),
        Case('MaxPooling2D pool_size 0', lambda: layers.MaxPooling2D(0), ValueError, 'pool_size'),
        Case('MaxPooling2D strides float', lambda: layers.MaxPooling2D(2, strides=1.5), TypeError, 'strides'),
        Case('Dense units 0', lambda: layers.Dense(0), ValueError, 'units'),
        Case('Dense units string', lambda: layers.Dense('8'), TypeError, 'units'),
        Case('Dense activation unknown', lambda: layers.Dense(2, activation='tanh'), ValueError, 'activation'),
        Case('Dense activation list', lambda: layers.Dense(2, activation=['relu']), ValueError, 'activation'),
        Case('Dropout rate 1', lambda: layers.Dropout(1.0), ValueError, 'rate'),
        Case('Dropout rate -0.1', lambda: layers.Dropout(-0.1), ValueError, 'rate'),
        Case('Dropout rate string', lambda: layers.Dropout('0.5'), TypeError, 'rate'),
        # -- Layer.forward, backward, set_weights --------------------------------------------
        Case('layer forward list', lambda: layers.Conv2D(2, 3, name='c').forward(x.tolist()), TypeError, "layer 'c'.*x"),
        Case('layer forward integers', lambda: layers.ReLU(name='r').forward(pixels), TypeError, "layer 'r'.*x"),
        Case('layer forward rank', lambda: layers.Conv2D(2, 3, name='c').forward(floats(8, 8, 3)), ShapeError, "layer 'c'"),
        Case('layer forward training string', lambda: layers.ReLU(name='r').forward(x, training='yes'), TypeError, 'training'),
        Case('layer second forward other channels', lambda: conv_run().forward(floats(2, 8, 8, 5)), ShapeError,
             "layer 'conv_probe' was built for inputs with 3 channels.*x"),
        Case('dense second forward other features', lambda: (lambda d: (d.forward(floats(2, 3)), d.forward(floats(2, 4))))(
            layers.Dense(2, name='d')), ShapeError, "layer 'd'.*3 channels"),
        Case('layer backward other shape', lambda: conv_run().backward(floats(2, 6, 6, 5)), ShapeError, "layer 'conv_probe'.*dy"),
        Case('layer backward list', lambda: conv_run().backward(floats(2, 6, 6, 4).tolist()), TypeError, "layer 'conv_probe'.*dy"),
        Case('add forward list', lambda: layers.Add(name='a').forward(x, x.tolist()), TypeError, "layer 'a'.*b"),
        Case('add forward shapes', lambda: layers.Add(name='a').forward(x, x[:1]), ShapeError, "layer 'a'"),
        Case('add backward other shape', lambda: (lambda a: (a.forward(x, x), a.backward(x[:1])))(layers.Add(name='a')),
             ShapeError, "layer 'a'.*dy"),
        Case('set_weights string', lambda: conv_run().set_weights('kernel'), TypeError, "layer 'conv_probe'"),
        Case('set_weights strings', lambda: conv_run().set_weights(['k', 'b']), TypeError, "layer 'conv_probe'.*'kernel'"),
        Case('set_weights nested ragged', lambda: conv_run().set_weights([[[1, 2], [3]], np.zeros(4)]), TypeError,
             "layer 'conv_probe'.*'kernel'"),
        Case('set_weights count', lambda: conv_run().set_weights([np.zeros((3, 3, 3, 4))]), ShapeError, "layer 'conv_probe'"),
        Case('set_weights shape', lambda: conv_run().set_weights([np.zeros((3, 3, 3, 4)), np.zeros(5)]), ShapeError,
             "layer 'conv_probe'.*'bias'"),
        # -- Model.forward, backward, predict, set_weights --------------------------------------
        Case('model forward list', lambda: tiny_model().forward(x.tolist()), TypeError, "model 'tiny'.*x"),
        Case('model forward uint8', lambda: tiny_model().forward(pixels), TypeError, "model 'tiny'.*preprocess_input"),
        Case('model forward shape', lambda: tiny_model().forward(floats(2, 8, 8, 4)), ShapeError, "model 'tiny'.*input"),
        Case('model forward training', lambda: tiny_model().forward(x, training=1), TypeError, 'training'),
        Case('model forward capture string', lambda: tiny_model().forward(x, capture='conv'), TypeError, 'capture'),
        Case('model forward capture unknown', lambda: tiny_model().forward(x, capture=['nope']), KeyError, 'nope'),
        Case('model forward start_after number', lambda: tiny_model().forward(x, start_after=1), TypeError, 'start_after'),
        Case('model forward stop_after number', lambda: tiny_model().forward(x, stop_after=0), TypeError, 'stop_after'),
        Case('model backward list', lambda: model_run().backward([[0.0] * 4] * 2), TypeError, "model 'tiny'.*dy"),
        Case('model backward shape', lambda: model_run().backward(floats(2, 5)), ShapeError, "model 'tiny'.*dy"),
        Case('model backward stop_at number', lambda: model_run().backward(floats(2, 4), stop_at=2), TypeError, 'stop_at'),
        Case('predict batch_size -1', lambda: tiny_model().predict(x, batch_size=-1), ValueError, 'batch_size'),
        Case('predict batch_size 2.5', lambda: tiny_model().predict(x, batch_size=2.5), TypeError, 'batch_size'),
        Case('predict batch_size None', lambda: tiny_model().predict(x, batch_size=None), TypeError, 'batch_size'),
        Case('predict batch_size True', lambda: tiny_model().predict(x, batch_size=True), TypeError, 'batch_size'),
        Case('predict fast string', lambda: tiny_model().predict(x, fast='no'), TypeError, 'fast'),
        Case('predict generator', lambda: tiny_model().predict(example for example in x), TypeError, "model 'tiny'.*x"),
        Case('predict list of sizes', lambda: tiny_model().predict([x[0], x[0, :7]]), ShapeError, 'x.*different shapes'),
        Case('predict empty list', lambda: tiny_model().predict([]), ValueError, 'at least one'),
        Case('predict uint8', lambda: tiny_model().predict(pixels), TypeError, "model 'tiny'.*preprocess_input"),
        Case('predict int64', lambda: tiny_model().predict(pixels.astype(np.int64)), TypeError, 'preprocess_input'),
        Case('predict uint8 plain layers', lambda: tiny_model().predict(pixels, fast=False), TypeError, 'preprocess_input'),
        Case('predict shape', lambda: tiny_model().predict(floats(2, 8, 8)), ShapeError, "model 'tiny'.*input"),
        Case('model set_weights string', lambda: tiny_model().set_weights('weights'), TypeError, "model 'tiny'"),
        Case('model set_weights strings', lambda: tiny_model().set_weights(['a'] * 6), TypeError, "weight 0.*'conv'"),
        Case('model set_weights count', lambda: tiny_model().set_weights([]), ShapeError, "model 'tiny'"),
        Case('model set_weights shape', lambda: tiny_model().set_weights([np.zeros((3, 3, 3, 5))] + [np.zeros(4)] * 5),
             ShapeError, "weight 0.*'conv'.*'kernel'"),
        # -- losses ------------------------------------------------------------------------------
        Case('BCE from_logits string', lambda: losses.BinaryCrossentropy(from_logits='yes'), TypeError, 'from_logits'),
        Case('BCE label 2', lambda: losses.BinaryCrossentropy().forward(np.full((2, 1), 0.5), [1, 2]), ValueError, 'y'),
        Case('BCE label -1', lambda: losses.BinaryCrossentropy(True).forward(np.zeros((2, 1)), [-1, 0]), ValueError, 'y'),
        Case('BCE label nan', lambda: losses.BinaryCrossentropy(True).forward(np.zeros((2, 1)), [np.nan, 0]), ValueError, 'y'),
        Case('BCE labels strings', lambda: losses.BinaryCrossentropy().forward(np.zeros((2, 1)), ['cat', 'dog']), TypeError, 'y'),
        Case('BCE labels count', lambda: losses.BinaryCrossentropy().forward(np.zeros((2, 1)), [0, 1, 1]), ShapeError, 'y'),
        Case('BCE pred list', lambda: losses.BinaryCrossentropy().forward([0.5, 0.5], [0, 1]), TypeError, 'pred'),
        Case('BCE pred integers', lambda: losses.BinaryCrossentropy().forward(np.zeros((2, 1), int), [0, 1]), TypeError, 'pred'),
        Case('BCE backward first', lambda: losses.BinaryCrossentropy().backward(), RuntimeError, 'forward'),
        Case('SCCE label 3 of 3', lambda: losses.SparseCategoricalCrossentropy(True).forward(np.zeros((2, 3)), [0, 3]),
             ValueError, 'y'),
        Case('SCCE label -1', lambda: losses.SparseCategoricalCrossentropy(True).forward(np.zeros((2, 3)), [-1, 0]),
             ValueError, 'y'),
        Case('SCCE label 1.5', lambda: losses.SparseCategoricalCrossentropy(True).forward(np.zeros((2, 3)), [1.5, 0]),
             ValueError, 'y'),
        Case('SCCE labels count', lambda: losses.SparseCategoricalCrossentropy().forward(np.zeros((2, 3)), [0]),
             ShapeError, 'y'),
        Case('SCCE pred rank', lambda: losses.SparseCategoricalCrossentropy().forward(np.zeros(3), [0]), ShapeError, 'pred'),
        Case('SCCE from_logits None', lambda: losses.SparseCategoricalCrossentropy(from_logits=None), TypeError, 'from_logits'),
        Case('SCCE backward first', lambda: losses.SparseCategoricalCrossentropy().backward(), RuntimeError, 'forward'),
        # -- optimizers --------------------------------------------------------------------------
        Case('SGD learning_rate nan', lambda: optimizers.SGD(float('nan')), ValueError, 'learning_rate'),
        Case('SGD learning_rate inf', lambda: optimizers.SGD(float('inf')), ValueError, 'learning_rate'),
        Case('SGD learning_rate 0', lambda: optimizers.SGD(0), ValueError, 'learning_rate'),
        Case('SGD learning_rate -1', lambda: optimizers.SGD(-1e-3), ValueError, 'learning_rate'),
        Case('SGD learning_rate string', lambda: optimizers.SGD('0.01'), TypeError, 'learning_rate'),
        Case('SGD learning_rate None', lambda: optimizers.SGD(None), TypeError, 'learning_rate'),
        Case('SGD momentum 1', lambda: optimizers.SGD(momentum=1.0), ValueError, 'momentum'),
        Case('SGD momentum -0.1', lambda: optimizers.SGD(momentum=-0.1), ValueError, 'momentum'),
        Case('SGD nesterov string', lambda: optimizers.SGD(nesterov='yes'), TypeError, 'nesterov'),
        Case('Adam beta_1 1', lambda: optimizers.Adam(beta_1=1.0), ValueError, 'beta_1'),
        Case('Adam beta_1 -0.5', lambda: optimizers.Adam(beta_1=-0.5), ValueError, 'beta_1'),
        Case('Adam beta_2 1', lambda: optimizers.Adam(beta_2=1.0), ValueError, 'beta_2'),
        Case('Adam beta_2 string', lambda: optimizers.Adam(beta_2='0.999'), TypeError, 'beta_2'),
        Case('Adam epsilon 0', lambda: optimizers.Adam(epsilon=0), ValueError, 'epsilon'),
        Case('Adam learning_rate nan', lambda: optimizers.Adam(learning_rate=float('nan')), ValueError, 'learning_rate'),
        Case('apply_gradients a model', lambda: optimizers.SGD().apply_gradients(tiny_model()), TypeError, 'layers'),
        Case('apply_gradients grad shape', lambda: optimizers.Adam().apply_gradients([dense_with_grad((3, 3))]),
             ShapeError, "layer 'dense_probe'.*'kernel'"),
        # -- gradcheck ---------------------------------------------------------------------------
        Case('check_layer layer', lambda: gradcheck.check_layer('conv', x), TypeError, 'layer'),
        Case('check_layer x list', lambda: gradcheck.check_layer(layers.ReLU(name='r'), x.tolist()), TypeError, 'x'),
        Case('check_layer x integers', lambda: gradcheck.check_layer(layers.ReLU(name='r'), pixels), TypeError, 'x'),
        Case('check_layer training', lambda: gradcheck.check_layer(layers.ReLU(), x, training='no'), TypeError, 'training'),
        Case('check_layer seed', lambda: gradcheck.check_layer(layers.ReLU(), x, seed=-1), ValueError, 'seed'),
        Case('check_layer eps 0', lambda: gradcheck.check_layer(layers.ReLU(), x, eps=0), ValueError, 'eps'),
        Case('check_layer eps string', lambda: gradcheck.check_layer(layers.ReLU(), x, eps='1e-6'), TypeError, 'eps'),
        Case('rel_error shapes', lambda: gradcheck.rel_error(np.zeros(3), np.zeros(4)), ShapeError, 'numeric'),
        Case('rel_error strings', lambda: gradcheck.rel_error('a', np.zeros(1)), TypeError, 'analytic'),
        Case('numerical_gradient f', lambda: gradcheck.numerical_gradient(None, np.zeros(2), np.zeros(2)), TypeError, 'f'),
        Case('numerical_gradient integer array', lambda: gradcheck.numerical_gradient(
            lambda: np.zeros(2), np.zeros(2, int), np.zeros(2)), TypeError, 'array'),
        Case('numerical_gradient dout shape', lambda: gradcheck.numerical_gradient(
            lambda: np.zeros(2), np.zeros(2), np.zeros(3)), ShapeError, 'dout'),
        Case('numerical_gradient eps', lambda: gradcheck.numerical_gradient(
            lambda: np.zeros(2), np.zeros(2), np.zeros(2), eps=-1), ValueError, 'eps'),
        Case('check_gradients forward', lambda: gradcheck.check_gradients(1, dict, {}, np.zeros(1)), TypeError, 'forward'),
        Case('check_gradients backward', lambda: gradcheck.check_gradients(dict, None, {}, np.zeros(1)), TypeError, 'backward'),
        Case('check_gradients arrays', lambda: gradcheck.check_gradients(dict, dict, [np.zeros(1)], np.zeros(1)),
             TypeError, 'arrays'),
        Case('check_gradients missing', lambda: gradcheck.check_gradients(
            lambda: np.zeros(1), lambda d: {}, {'w': np.zeros(1)}, np.zeros(1)), ValueError, 'w'),
        # -- explain -----------------------------------------------------------------------------
        Case('class_scores class 2 of 2', lambda: explain.class_scores(np.zeros((1, 1)), [2]), ValueError, 'class_index'),
        Case('class_scores class 0.5', lambda: explain.class_scores(np.zeros((1, 1)), [0.5]), TypeError, 'classes'),
        Case('class_scores count', lambda: explain.class_scores(np.zeros((3, 1)), [0, 1]), ShapeError, 'classes'),
        Case('gradient_at model', lambda: explain.gradient_at('model', tiny_head(), x), TypeError, 'model'),
        Case('gradient_at head', lambda: explain.gradient_at(tiny_model(), None, x), TypeError, 'head'),
        Case('gradient_at x uint8', lambda: explain.gradient_at(tiny_model(), tiny_head(), pixels), TypeError,
             'preprocess_input'),
        Case('gradient_at x list', lambda: explain.gradient_at(tiny_model(), tiny_head(), x.tolist()), TypeError, 'x'),
        Case('gradient_at layer unknown', lambda: explain.gradient_at(tiny_model(), tiny_head(), x, layer='nope'),
             KeyError, 'nope'),
        Case('gradient_at layer number', lambda: explain.gradient_at(tiny_model(), tiny_head(), x, layer=3), TypeError,
             'layer'),
        Case('gradient_at class_index 5', lambda: explain.gradient_at(tiny_model(), tiny_head(), x, 'relu', 5),
             ValueError, 'class_index'),
        Case('gradient_at class_index float', lambda: explain.gradient_at(tiny_model(), tiny_head(), x, 'relu', 1.0),
             TypeError, 'class_index'),
        Case('gradient_at class_index count', lambda: explain.gradient_at(tiny_model(), tiny_head(), x, 'relu',
                                                                           [0, 1, 0]), ShapeError, 'class_index'),
        Case('grad_cam flat layer', lambda: explain.grad_cam(tiny_model(), tiny_head(), x, layer='pool'), ValueError,
             "'pool'"),
        Case('grad_cam class_index string', lambda: explain.grad_cam(tiny_model(), tiny_head(), x, 'relu', 'cats'),
             TypeError, 'class_index'),
        Case('cam_from shapes', lambda: explain.cam_from(floats(1, 2, 2, 3), floats(1, 2, 2, 4)), ShapeError, 'gradient'),
        Case('cam_from rank', lambda: explain.cam_from(floats(1, 3), floats(1, 3)), ShapeError, 'activation'),
        Case('noisy_copy noise -1', lambda: explain.noisy_copy(x, -1, np.random.default_rng()), ValueError, 'noise'),
        Case('noisy_copy rng', lambda: explain.noisy_copy(x, 0.1, 0), TypeError, 'rng'),
        Case('saliency samples 0', lambda: explain.saliency(tiny_model(), tiny_head(), x, samples=0), ValueError, 'samples'),
        Case('saliency samples 2.5', lambda: explain.saliency(tiny_model(), tiny_head(), x, samples=2.5), TypeError,
             'samples'),
        Case('saliency noise nan', lambda: explain.saliency(tiny_model(), tiny_head(), x, noise=float('nan')),
             ValueError, 'noise'),
        Case('saliency seed', lambda: explain.saliency(tiny_model(), tiny_head(), x, seed='0'), TypeError, 'seed'),
        Case('saliency progress', lambda: explain.saliency(tiny_model(), tiny_head(), x, progress=True), TypeError,
             'progress'),
        Case('saliency x uint8', lambda: explain.saliency(tiny_model(), tiny_head(), pixels), TypeError,
             'preprocess_input'),
        Case('saliency_image rank', lambda: explain.saliency_image(floats(2, 8, 8)), ShapeError, 'gradient'),
        Case('saliency_image percentile', lambda: explain.saliency_image(x, percentile=150), ValueError, 'percentile'),
        # -- compare -----------------------------------------------------------------------------
        Case('build_pair path', lambda: compare_module.build_pair(None), TypeError, 'path'),
        Case('build_pair reference', lambda: compare_module.build_pair('w.h5', reference=3), TypeError, 'reference'),
        Case('build_pair size', lambda: compare_module.build_pair('w.h5', size=2.5), TypeError, 'size'),
        Case('load_photos one string', lambda: compare_module.load_photos('cat.jpg', 71, 71), TypeError, 'paths'),
        Case('load_photos height', lambda: compare_module.load_photos(['cat.jpg'], 0, 71), ValueError, 'height'),
        Case('load_photos width', lambda: compare_module.load_photos(['cat.jpg'], 71, '71'), TypeError, 'width'),
        Case('compare pair', lambda: compare_module.compare(None, pixels, ['conv']), TypeError, 'pair'),
        Case('compare photos list', lambda: compare_module.compare(compare_pair(), pixels.tolist(), ['conv']), TypeError,
             'photos'),
        Case('compare photos rank', lambda: compare_module.compare(compare_pair(), pixels[0], ['conv']), ShapeError,
             'photos'),
        Case('compare names string', lambda: compare_module.compare(compare_pair(), pixels, 'conv'), TypeError, 'names'),
        Case('compare batch_size', lambda: compare_module.compare(compare_pair(), pixels, ['conv'], batch_size=0),
             ValueError, 'batch_size'),
        Case('select_layers patterns string', lambda: compare_module.select_layers(['conv'], 'conv'), TypeError,
             'patterns'),
        Case('select_layers all_names', lambda: compare_module.select_layers(None, None), TypeError, 'all_names'),
        Case('report rows', lambda: compare_module.report([]), TypeError, 'rows'),
        Case('report tolerance', lambda: compare_module.report([compare_module.Row('a', (1,))], tolerance=-1),
             ValueError, 'tolerance'),
        Case('report print_fn', lambda: compare_module.report([compare_module.Row('a', (1,))], print_fn=None),
             TypeError, 'print_fn'),
    ]


CASES = cases()


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_a_wrong_argument_is_refused_at_the_door_naming_it(case):
    with pytest.raises(case.error, match=case.names) as refused:
        case.call()
    message = str(refused.value)
    assert '\n' not in message, message                     # one line
    assert type(refused.value) in (TypeError, ValueError, ShapeError, KeyError, RuntimeError), type(refused.value)


def test_every_public_function_has_a_row():
    """The table covers every public function and constructor this file names (a new one
    without a row fails here)."""
    covered = ' '.join(case.id for case in CASES)
    public = ['Xception', 'preprocess_input', 'Conv2D', 'DepthwiseConv2D', 'PointwiseConv2D', 'SeparableConv2D',
              'BatchNormalization', 'MaxPooling2D', 'Dense', 'Dropout', 'layer forward', 'layer backward', 'set_weights',
              'add forward', 'add backward', 'model forward', 'model backward', 'predict', 'model set_weights', 'BCE',
              'SCCE', 'SGD', 'Adam', 'apply_gradients', 'check_layer', 'rel_error', 'numerical_gradient',
              'check_gradients', 'class_scores', 'gradient_at', 'grad_cam', 'cam_from',
              'noisy_copy', 'saliency ', 'saliency_image', 'build_pair', 'load_photos', 'compare ', 'select_layers',
              'report']
    assert [name for name in public if name not in covered + ' '] == []


def test_the_right_arguments_still_pass_the_door():
    """The checks refuse only what is wrong: NumPy integers and bools where ints and flags go,
    soft labels in [0, 1], a list of same-sized examples for predict, float64 input."""
    layers.Conv2D(np.int64(2), (np.int32(3), 3), strides=[1, 1], use_bias=np.bool_(False))
    optimizers.Adam(learning_rate=np.float32(1e-3), beta_1=0, beta_2=0.0)
    optimizers.SGD(1, momentum=0.9, nesterov=np.bool_(True))
    assert np.isfinite(losses.BinaryCrossentropy().forward(np.full((2, 1), 0.5), [0.1, 0.9]))
    assert np.isfinite(losses.SparseCategoricalCrossentropy().forward(np.full((2, 3), 1 / 3), np.array([2.0, 0.0])))
    model, x = tiny_model(), floats(3, 8, 8, 3)
    np.testing.assert_allclose(model.predict(list(x), batch_size=np.int64(2)), model.predict(x.astype(np.float64)),
                               rtol=1e-6)
    assert minixcept.Xception(include_top=False, input_shape=[np.int64(71), None, 3], middle_blocks=1,
                              middle_width=8).input_shape == (71, None, 3)
