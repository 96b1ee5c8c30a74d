"""python -m minixcept.compare: minixcept against Keras layer by layer, as a porter runs it.

Keras is the reference side of the tool itself, so these tests need TensorFlow (they skip
without it, and fail in CI); the first one checks what happens when it is missing. Photos
run at small sizes (80-96 px) to stay fast: the tool's numbers at 299 px are in README.md.
"""
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from conftest import REPO
from minixcept.workflows import compare

PHOTOS = ('validation/cats/cat.0.jpg', 'validation/dogs/dog.0.jpg')


def run_compare(*argv):
    """(exit status, printed lines) of the command line run in this process."""
    lines = []
    status = compare.main([str(a) for a in argv], print_fn=lines.append)
    return status, lines


def rows_of(lines):
    """{layer name: (relative error, marked)} from the printed table."""
    rows = {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) >= 3 and not line.startswith(('OK', 'FAIL')) and 'compared' not in line:
            error = float(line.split(')')[-1].split()[1])
            rows[parts[0]] = (error, '<-- first over' in line)
    return rows


@pytest.fixture(scope='module')
def photos(catdog):
    return [catdog / photo for photo in PHOTOS]


# -- without TensorFlow ---------------------------------------------------------------------
def test_says_plainly_that_it_needs_tensorflow(notop_weights):
    script = textwrap.dedent(f'''
        import runpy, sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('tensorflow', 'keras'):
                    raise ImportError(name + ' is hidden in this test')
        sys.meta_path.insert(0, Hide())
        sys.argv = ['compare', {str(notop_weights)!r}, 'photo.jpg']
        runpy.run_module('minixcept.compare', run_name='__main__')
    ''')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert run.stdout == '' and len(run.stderr.strip().splitlines()) == 1
    assert 'needs TensorFlow' in run.stderr and 'pip install tensorflow-cpu' in run.stderr


def test_selecting_an_unknown_layer_names_the_closest():
    names = ['block1_conv1', 'block1_conv1_bn', 'block14_sepconv2_act']
    assert compare.select_layers(names, ['block1_*']) == names[:2]
    with pytest.raises(compare.CompareError, match="'block1_conv1_bn'"):
        compare.select_layers(names, ['block1_conv_bn'])


# -- weights files ----------------------------------------------------------------------------
def test_the_notop_file_passes(tf, notop_weights, photos):
    status, lines = run_compare(notop_weights, *photos, '--size', '96')
    rows = rows_of(lines)
    assert status == 0, '\n'.join(lines)
    assert len(rows) == 131 and list(rows)[0] == 'block1_conv1' and list(rows)[-1] == 'block14_sepconv2_act'
    assert all(error <= compare.TOLERANCE and not marked for error, marked in rows.values())
    assert lines[-1].startswith('OK') and '2 photos at 96 x 96' in lines[0]


def test_an_altered_tensor_fails_and_is_named_first(tf, notop_weights, photos, tmp_path):
    """One tensor of a copy scaled by 1.01 (block 4's shortcut kernel, 'conv2d_3' in the Keras 2
    file, 'conv2d_2' in Keras 3 and minixcept): minixcept runs the copy, Keras the original."""
    altered = tmp_path / 'altered.h5'
    shutil.copy(notop_weights, altered)
    with h5py.File(altered, 'r+') as f:
        kernel = f['conv2d_3/conv2d_3/kernel:0']
        kernel[...] = kernel[...] * np.float32(1.01)
    status, lines = run_compare(altered, photos[0], '--size', '80', '--reference', notop_weights)
    rows = rows_of(lines)
    assert status == 1
    marked = [name for name, (_, is_marked) in rows.items() if is_marked]
    assert marked == ['conv2d_2']
    names = list(rows)
    assert all(rows[name][0] <= compare.TOLERANCE for name in names[:names.index('conv2d_2')])
    assert rows['conv2d_2'][0] == pytest.approx(0.01, rel=1e-3)
    assert lines[-1].startswith('FAIL') and 'the first at conv2d_2' in lines[-1]


# -- a .keras model from transfer learning ---------------------------------------------------
@pytest.fixture(scope='module')
def transfer_models(tf, notop_weights, tmp_path_factory):
    """Two Keras transfer-learning models saved as .keras, as a Keras user builds them:
    - sequential: a frozen Xception base (ImageNet notop weights, 80 x 80) and a head of
      GlobalAveragePooling2D, Dropout, Dense(8, relu), Dense(1, sigmoid); saved again with the
      last Dense changed (``changed``);
    - functional: Input(None, None, 3) into Xception(pooling='avg', random weights) called with
      training=False, then Dropout and Dense(3, softmax);
    - flat: the sequential model's base with a head built on ``base.output`` (GlobalMaxPooling2D,
      Dense(2)), so Xception's layers are the model's own."""
    import keras
    folder = tmp_path_factory.mktemp('transfer')
    keras.utils.set_random_seed(3)
    base = keras.applications.Xception(weights=None, include_top=False, input_shape=(80, 80, 3))
    base.load_weights(str(notop_weights))
    base.trainable = False
    sequential = keras.Sequential([keras.Input((80, 80, 3)), base, keras.layers.GlobalAveragePooling2D(),
                                   keras.layers.Dropout(0.3), keras.layers.Dense(8, activation='relu'),
                                   keras.layers.Dense(1, activation='sigmoid')])
    sequential.save(folder / 'sequential.keras')
    kernel, bias = sequential.layers[-1].get_weights()
    sequential.layers[-1].set_weights([kernel * np.float32(1.5), bias])
    sequential.save(folder / 'changed.keras')

    inputs = keras.Input((None, None, 3))
    pooled = keras.applications.Xception(weights=None, include_top=False, pooling='avg')(inputs, training=False)
    outputs = keras.layers.Dense(3, activation='softmax')(keras.layers.Dropout(0.2)(pooled))
    keras.Model(inputs, outputs).save(folder / 'functional.keras')

    flat = keras.Model(base.input, keras.layers.Dense(2)(keras.layers.GlobalMaxPooling2D()(base.output)))
    flat.save(folder / 'flat.keras')
    return {'sequential': (folder / 'sequential.keras', [layer.name for layer in sequential.layers[1:]]),
            'changed': folder / 'changed.keras', 'functional': folder / 'functional.keras',
            'flat': (folder / 'flat.keras', [layer.name for layer in flat.layers[-2:]])}


def test_a_transfer_learning_model_compares_its_head_too(transfer_models, photos):
    path, head_names = transfer_models['sequential']
    status, lines = run_compare(path, *photos)
    rows = rows_of(lines)
    assert status == 0, '\n'.join(lines)
    assert '80 x 80' in lines[0]                                   # the model's own size
    assert list(rows)[-4:] == head_names and len(rows) == 131 + 4
    assert all(error <= compare.TOLERANCE for error, _ in rows.values())


def test_a_changed_head_fails_at_that_layer(transfer_models, photos):
    """minixcept runs the saved model, Keras the one whose last Dense kernel was scaled."""
    path, head_names = transfer_models['sequential']
    status, lines = run_compare(path, photos[0], '--reference', transfer_models['changed'])
    rows = rows_of(lines)
    assert status == 1
    assert [name for name, (_, marked) in rows.items() if marked] == [head_names[-1]]
    assert all(rows[name][0] <= compare.TOLERANCE for name in list(rows)[:-1])


def test_a_functional_model_with_a_pooling_base_at_a_chosen_size(transfer_models, photos):
    status, lines = run_compare(transfer_models['functional'], photos[1], '--size', '75x90',
                                '--layers', 'block14_*', 'global_average_pooling2d', 'dropout*', 'dense*')
    rows = rows_of(lines)
    assert status == 0, '\n'.join(lines)
    assert '1 photo at 75 x 90' in lines[0]
    names = list(rows)
    assert names[-3] == 'global_average_pooling2d'                  # the base's pooling
    assert [name.rstrip('_0123456789') for name in names[-2:]] == ['dropout', 'dense']     # Keras numbers them
    assert len(rows) == 6 + 3


def test_a_model_built_on_the_base_output(transfer_models, photos):
    """Xception's layers at the model's own level, the head after block 14."""
    path, head_names = transfer_models['flat']
    status, lines = run_compare(path, photos[0], '--layers', 'block14_sepconv2*', *head_names)
    assert status == 0, '\n'.join(lines)
    assert list(rows_of(lines)) == ['block14_sepconv2', 'block14_sepconv2_bn', 'block14_sepconv2_act'] + head_names
    assert '80 x 80' in lines[0]
