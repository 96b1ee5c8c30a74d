"""The chapter-6 check: reading one layer's tensors from Keras's HDF5 file in Keras order. It
passes the model answer and names each wrong answer written here on purpose (layer, weight,
mistake), judged against Keras's activations on the stored photo."""
import h5py
import numpy as np
import pytest

from minixcept import course
from minixcept.course import weights



@pytest.fixture(autouse=True)
def _weights_file(notop_weights):
    """The check reads the notop file: fetched once by the shared fixture (a skip saying why
    locally, a failure in CI), rather than skipped whenever a fresh clone has not fetched it yet."""
    assert notop_weights == weights.NOTOP_FILE


def _group_names(group):
    return [n.decode() for n in group.attrs['weight_names']]


def read_alphabetically(h5_path, layer_name):
    """Every dataset under the group, in the order h5py walks them (by name)."""
    found = []
    with h5py.File(h5_path, 'r') as f:
        f[layer_name].visititems(lambda name, obj: found.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def read_mean_variance_swapped(h5_path, layer_name):
    arrays = weights.read_layer_weights(h5_path, layer_name)
    if len(arrays) == 4:
        arrays[2], arrays[3] = arrays[3], arrays[2]
    return arrays


def read_separable_swapped(h5_path, layer_name):
    arrays = weights.read_layer_weights(h5_path, layer_name)
    if 'sepconv' in layer_name and not layer_name.endswith('_bn'):
        arrays = arrays[::-1]
    return arrays


def read_torch_layout(h5_path, layer_name):
    return [np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 and a.shape[:2] == (3, 3) and a.shape[3] > 1 else a
            for a in weights.read_layer_weights(h5_path, layer_name)]


def read_datasets_of_closed_file(h5_path, layer_name):
    with h5py.File(h5_path, 'r') as f:
        group = f[layer_name]
        return [group[name] for name in _group_names(group)]


def test_the_model_answer_passes():
    verdict = course.check_read_layer_weights(weights.read_layer_weights)
    assert verdict, str(verdict)
    assert 'conv2d_1' in str(verdict) and 'batch_normalization_1' in str(verdict)


@pytest.mark.parametrize('wrong, words', [
    (read_alphabetically, ["block1_conv1_bn", "layer block1_conv1_bn's output", 'alphabetical order',
                           'beta, gamma', 'weight_names']),
    (read_mean_variance_swapped, ["block1_conv1_bn", 'moving_mean and moving_variance swapped']),
    (read_separable_swapped, ['block2_sepconv1', 'array 0 has shape (1, 1, 64, 128)', 'depthwise_kernel',
                              'depthwise and pointwise kernels swapped']),
    (read_torch_layout, ['block1_conv1', 'array 0 has shape (32, 3, 3, 3)', 'kernel', "PyTorch's"]),
    (read_datasets_of_closed_file, ['block1_conv1', 'cannot be read', 'dataset[()]']),
])
def test_each_wrong_reader_is_named(wrong, words):
    verdict = course.check_read_layer_weights(wrong)
    assert not verdict
    for word in words:
        assert word in str(verdict), str(verdict)


def test_a_weight_that_is_not_a_known_mistake_is_named():
    def read_gamma_for_beta(h5_path, layer_name):
        arrays = weights.read_layer_weights(h5_path, layer_name)
        if layer_name == 'block1_conv2_bn':
            arrays[1] = arrays[0]
        return arrays
    text = str(course.check_read_layer_weights(read_gamma_for_beta))
    assert "layer block1_conv2_bn's output" in text and "Weight 1 differs from the file's block1_conv2_bn/beta:0" in text
    assert 'gamma' in text


def test_not_written_yet():
    def stub(h5_path, layer_name):
        raise NotImplementedError
    assert 'not written yet' in str(course.check_read_layer_weights(stub))
