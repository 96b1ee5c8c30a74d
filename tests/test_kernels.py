"""The engines' kernels (minixcept.engines.kernels) against the definitions written as loops.

The kernels work on one tile or block at a time; here each is compared, element by element,
with the plain formula on small arrays: tiles of a strided 'same' convolution, max pooling
(with the first-of-ties argmax the textbook layer records), and the stride-1 depthwise
convolution and its kernel gradient that the training engine runs tile by tile.
"""
import numpy as np
import pytest

from minixcept.engines import kernels
from minixcept.engines.kernels import depthwise_tile, gather_rows, max_pool_tile, max_pool_tile_with_argmax
from minixcept.padding import window_geometry


@pytest.mark.parametrize('method', ['multiply-adds', 'einsum'])
def test_depthwise_tile_matches_a_naive_loop(monkeypatch, rng, method):
    """gather_rows + depthwise_tile for rows 2..5 of a 'same' 3x3 stride-2 convolution, against
    the definition written as loops; by separate multiplies and adds, and by one einsum (which
    the tile takes from EINSUM_MIN_CHANNELS channels on)."""
    monkeypatch.setattr(kernels, 'EINSUM_MIN_CHANNELS', 1 if method == 'einsum' else 10 ** 9)
    x = rng.standard_normal((1, 9, 8, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 1)).astype(np.float32)
    (out_h, out_w), pads = window_geometry((9, 8), (3, 3), (2, 2), 'same')
    top, bottom = 2, 5
    x_tile = np.empty((1, (bottom - top - 1) * 2 + 3, 8 + sum(pads[1]), 3), np.float32)
    rows_in = gather_rows(x, slice(0, 1), top, bottom, 3, 2, pads, x_tile)
    out = np.empty((1, bottom - top, out_w, 3), np.float32)
    depthwise_tile(rows_in, kernels.along_width(kernel[:, :, :, 0], out_w), (2, 2), out, np.empty_like(out))
    x_padded = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    for i in range(top, bottom):
        for j in range(out_w):
            for c in range(3):
                expected = sum(x_padded[0, 2 * i + p, 2 * j + q, c] * kernel[p, q, c, 0]
                               for p in range(3) for q in range(3))
                assert abs(out[0, i - top, j, c] - expected) <= 1e-5 * max(1.0, abs(expected))


def test_max_pool_tile_matches_a_naive_loop(rng):
    x = rng.standard_normal((2, 7, 7, 2)).astype(np.float32)
    (out_h, out_w), pads = window_geometry((7, 7), (3, 3), (2, 2), 'same')
    x_tile = np.empty((2, (out_h - 1) * 2 + 3, 7 + sum(pads[1]), 2), np.float32)
    padded = gather_rows(x, slice(0, 2), 0, out_h, 3, 2, pads, x_tile, fill=-np.inf)
    out = np.empty((2, out_h, out_w, 2), np.float32)
    max_pool_tile(padded, (3, 3), (2, 2), out, np.empty((2, padded.shape[1], out_w, 2), np.float32))
    (top, _), (left, _) = pads
    for n in range(2):
        for i in range(out_h):
            for j in range(out_w):
                rows = slice(max(2 * i - top, 0), 2 * i - top + 3)
                cols = slice(max(2 * j - left, 0), 2 * j - left + 3)
                assert np.array_equal(out[n, i, j], x[n, rows, cols].max(axis=(0, 1)))


def test_depthwise_helpers_against_a_naive_loop(rng):
    """depthwise_rows and depthwise_kernel_gradient on uneven padding, element by element."""
    x = rng.standard_normal((2, 6, 5, 3))
    dz = rng.standard_normal((2, 6, 4, 3))                   # kernel 2x3, pads (1, 0) rows, (0, 1) cols
    kernel = rng.standard_normal((2, 3, 3))
    pads = ((1, 0), (0, 1))
    x_pad = np.pad(x, ((0, 0), (1, 0), (0, 1), (0, 0)))
    expected = np.zeros_like(dz)
    expected_dk = np.zeros_like(kernel)
    for i in range(6):
        for j in range(4):
            expected[:, i, j] = (x_pad[:, i:i + 2, j:j + 3] * kernel).sum(axis=(1, 2))
            expected_dk += np.einsum('npqc,nc->pqc', x_pad[:, i:i + 2, j:j + 3], dz[:, i, j])
    got = kernels.depthwise_rows(x, kernel, pads, np.empty_like(dz))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels.depthwise_kernel_gradient(x, dz, (2, 3), pads), expected_dk,
                               rtol=1e-12, atol=1e-12)

def test_max_pool_tile_with_argmax_keeps_the_first_of_ties(rng):
    """On small integers (many ties) the max and the winning offset p * kw + q of every window,
    the first in row-major order where several tie, as the textbook layer records it."""
    x = rng.integers(-2, 3, (2, 7, 6, 3)).astype(np.float32)
    (out_h, out_w), pads = window_geometry((7, 6), (3, 3), (2, 2), 'same')
    x_tile = np.empty((2, (out_h - 1) * 2 + 3, 6 + sum(pads[1]), 3), np.float32)
    padded = gather_rows(x, slice(0, 2), 0, out_h, 3, 2, pads, x_tile, fill=-np.inf)
    out, argmax = np.empty((2, out_h, out_w, 3), np.float32), np.empty((2, out_h, out_w, 3), np.int8)
    max_pool_tile_with_argmax(padded, (3, 3), (2, 2), out, argmax)
    for n in range(2):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(3):
                    window_values = [padded[n, 2 * i + p, 2 * j + q, c] for p in range(3) for q in range(3)]
                    best = max(window_values)
                    assert out[n, i, j, c] == best
                    assert argmax[n, i, j, c] == window_values.index(best)
