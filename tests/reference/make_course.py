"""TensorFlow references for the course's grader (minixcept/course/): 'same' padding.

    python tests/reference/generate.py course       # rewrites course_padding.npz beside this file

'same' padding cannot be asked of TensorFlow directly: it pads inside the convolution and
reports only the result. So each case runs a convolution whose result reveals the padding.
The input along one axis is x = 1, 2, ..., size (a zero can then only be padding), and the
kernel holds ``kernel`` one-hot filters, filter p having its single 1 at tap p. Output
channel p of output i is then x_pad[i * stride + p]: the input value that tap p of window
i reads, or 0 where it reads a padding row. The output's length is TensorFlow's ceil(size /
stride), and its first zeros say how many rows were padded before.

Cases: every size 1..17, kernel 1..5 and stride 1..3, one spatial axis (a (1, size, 1, 1)
input to tf.nn.conv2d with padding 'SAME'), stored in ``course_padding.npz`` under
``n<size>_k<kernel>_s<stride>/input/x`` (size,) and ``.../output/y`` (out, kernel).

This module never imports minixcept: a reference must not come from the code it checks.
TensorFlow is imported only inside ``run_same``, so the tests can read the cases without it.
"""
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = range(1, 18)
KERNELS = range(1, 6)
STRIDES = range(1, 4)


def case_name(size, kernel, stride):
    return f'n{size}_k{kernel}_s{stride}'


def padding_cases():
    """(size, kernel, stride) for every stored case."""
    return [(size, kernel, stride) for stride in STRIDES for kernel in KERNELS for size in SIZES]


def revealing_input(size):
    return np.arange(1, size + 1, dtype=np.float32)               # 1..size: a 0 can only be padding


def run_same(size, kernel, stride):
    """TensorFlow's 'SAME' convolution of 1..size with the one-hot filters: (out, kernel)."""
    import tensorflow as tf
    x = revealing_input(size).reshape(1, size, 1, 1)               # (N, H, W, C) = (1, size, 1, 1)
    one_hot = np.eye(kernel, dtype=np.float32).reshape(kernel, 1, 1, kernel)   # (kh, kw, C_in, C_out)
    y = tf.nn.conv2d(x, one_hot, strides=(1, stride, 1, 1), padding='SAME')   # (1, out, 1, kernel)
    return y.numpy()[0, :, 0, :]


def make(out_dir):
    arrays = {}
    for size, kernel, stride in padding_cases():
        name = case_name(size, kernel, stride)
        arrays[f'{name}/input/x'] = revealing_input(size)
        arrays[f'{name}/output/y'] = run_same(size, kernel, stride)
    np.savez_compressed(Path(out_dir) / 'course_padding.npz', **arrays)
