"""TensorFlow's 'valid' and 'same' arithmetic, and the padding helpers every windowed layer uses.

The decisive test runs TensorFlow itself: for every size, kernel and stride in a
grid (Xception's own sizes included), a 'same' convolution must equal a 'valid'
one on the input padded by minixcept's (before, after), and both output lengths
must be minixcept's. Integer-valued inputs make the comparison exact.
"""
import numpy as np
import pytest

import oracles
from minixcept.padding import (as_pair, check_padding, crop_spatial, output_length, pad_before_after,
                               pad_spatial, window, window_geometry)

SIZES = list(range(1, 10)) + [19, 37, 74, 147]         # the last four: Xception's pooled sizes at 299
KERNELS = [1, 2, 3, 4]
STRIDES = [1, 2, 3]


def test_xception_stride2_padding_at_299():
    """TensorFlow pads the larger half after (minixcept/padding.py says why it matters), so
    block3_pool, the one odd-sized stride-2 'same' window of Xception at 299, pads (0, 1)."""
    size = output_length(299, 3, 2, 'valid')              # block1_conv1
    size = output_length(size, 3, 1, 'valid')             # block1_conv2
    assert size == 147
    pools = {}
    for name in ('block2_pool', 'block3_pool', 'block4_pool', 'block13_pool'):
        pools[name] = (size, pad_before_after(size, 3, 2, 'same'))
        size = output_length(size, 3, 2, 'same')
    assert pools == {'block2_pool': (147, (1, 1)), 'block3_pool': (74, (0, 1)),
                     'block4_pool': (37, (1, 1)), 'block13_pool': (19, (1, 1))}
    assert size == 10                                     # the exit flow's 10 x 10
    assert pad_before_after(74, 1, 2, 'same') == (0, 0)   # the 1x1 shortcut beside block3_pool


@pytest.mark.parametrize('padding', ['valid', 'same'])
def test_arithmetic_matches_the_written_out_rule(padding):
    """Against the loop oracles' own version of TensorFlow's rule, over the whole grid."""
    for size in SIZES:
        for kernel in KERNELS:
            for stride in STRIDES:
                if padding == 'valid' and kernel > size:
                    continue
                out, before, after = oracles.tf_padding(size, kernel, stride, padding)
                assert output_length(size, kernel, stride, padding) == out
                assert pad_before_after(size, kernel, stride, padding) == (before, after)


def test_padding_matches_tensorflow(tf):
    checked = 0
    for size in SIZES:
        x = tf.constant(np.arange(1, size + 1, dtype=np.float32).reshape(1, size, 1, 1) % 7 - 3)
        for kernel_size in KERNELS:
            kernel = tf.constant(np.arange(1, kernel_size + 1, dtype=np.float32).reshape(kernel_size, 1, 1, 1))
            for stride in STRIDES:
                strides = (1, stride, 1, 1)
                same = tf.nn.conv2d(x, kernel, strides, 'SAME')
                before, after = pad_before_after(size, kernel_size, stride, 'same')
                padded = tf.pad(x, [[0, 0], [before, after], [0, 0], [0, 0]])
                explicit = tf.nn.conv2d(padded, kernel, strides, 'VALID')
                assert same.shape[1] == output_length(size, kernel_size, stride, 'same')
                np.testing.assert_array_equal(same.numpy(), explicit.numpy(),
                                              err_msg=f'size {size}, kernel {kernel_size}, stride {stride}')
                if kernel_size <= size:
                    valid = tf.nn.conv2d(x, kernel, strides, 'VALID')
                    assert valid.shape[1] == output_length(size, kernel_size, stride, 'valid')
                checked += 1
    assert checked == len(SIZES) * len(KERNELS) * len(STRIDES)


def test_window_geometry_rectangular_and_too_small():
    assert window_geometry((8, 7), (3, 3), (2, 2), 'same') == ((4, 4), ((0, 1), (1, 1)))
    assert window_geometry((6, 7), (3, 2), (1, 2), 'valid') == ((4, 3), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match='does not fit'):
        window_geometry((2, 5), (3, 3), (1, 1), 'valid')


def test_argument_checks():
    assert as_pair(3) == (3, 3) and as_pair((2, 1)) == (2, 1)
    assert check_padding('SAME') == 'same'
    with pytest.raises(ValueError, match='padding'):
        check_padding('full')
    with pytest.raises(ValueError, match='strides'):
        as_pair((1, 2, 3), 'strides')


def test_pad_and_crop(xp):
    x = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 2)))
    pads = ((0, 1), (2, 1))
    padded = pad_spatial(x, pads, value=-np.inf)
    assert padded.shape == (2, 4, 7, 2)
    assert bool((padded[:, 3] == -np.inf).all()) and bool((padded[:, :, :2] == -np.inf).all())
    assert bool((padded[:, :, 6] == -np.inf).all())
    assert bool((crop_spatial(padded, pads) == x).all())
    assert pad_spatial(x, ((0, 0), (0, 0))) is x            # nothing to pad: no copy


def test_window_is_what_each_kernel_offset_sees(xp):
    x_padded = xp.asarray(np.random.default_rng(1).standard_normal((1, 7, 6, 2)))
    out_hw, strides = (3, 2), (2, 3)
    for i in range(2):
        for j in range(3):
            view = window(x_padded, i, j, out_hw, strides)
            assert view.shape == (1, 3, 2, 2)
            for row in range(3):
                for col in range(2):
                    assert bool((view[0, row, col] == x_padded[0, i + 2 * row, j + 3 * col]).all())
