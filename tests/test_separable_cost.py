"""examples/separable_cost.py: its counts against Keras's count_params() for the same layers.

The article's case, 16 -> 32 channels with a 3x3 window: 4,608 weights as a full
convolution, 2,304 factorised (1x3 then 3x1), 800 pointwise then depthwise, 656 depthwise
then pointwise (Keras's SeparableConv2D), 608 with the depthwise half factorised, each
keeping the M x M size; and the whole network's variants. Stored counts come from
tests/reference/make_explain.py; the live ones from Keras now.
"""
import sys

import numpy as np
import pytest

import minixcept
from conftest import REFERENCE_DIR
from test_catdog import load_example

sys.path.insert(0, str(REFERENCE_DIR))
import make_explain as reference  # noqa: E402

ARTICLE = {'full': 4608, 'pointwise_depthwise': 800, 'depthwise_pointwise': 656}


@pytest.fixture(scope='module')
def example():
    return load_example('separable_cost')


@pytest.fixture(params=['stored', 'live'])
def keras_counts(request):
    """{'weights/<row>', 'shape/<row>', 'network/<variant>'} from Keras: stored or now."""
    if request.param == 'stored':
        with np.load(REFERENCE_DIR / 'explain_costs.npz') as arrays:
            return {key: value.tolist() for key, value in arrays.items()}
    request.getfixturevalue('tf')
    counts = {}
    for row, (weights, shape) in reference.keras_cost_counts(**reference.COST_CASE).items():
        counts[f'weights/{row}'], counts[f'shape/{row}'] = weights, list(shape)
    counts.update({f'network/{variant}': count for variant, count in reference.keras_network_counts().items()})
    return counts


def test_one_layer_counts_match_keras(example, keras_counts):
    case = reference.COST_CASE
    table = example.layer_costs(case['c_in'], case['c_out'], case['kernel'], size=reference.COST_SIZE,
                                batch=1, timed=False)
    assert [entry['row'] for entry in table] == list(example.ROWS)
    for entry in table:
        assert entry['weights'] == keras_counts[f"weights/{entry['row']}"], entry['row']
        assert list(entry['output_shape']) == keras_counts[f"shape/{entry['row']}"], entry['row']
        # stride 1, 'same': one multiply-add per weight per output pixel, M * M of them
        assert entry['multiply_adds'] == entry['weights'] * reference.COST_SIZE ** 2, entry['row']
    by_row = {entry['row']: entry['weights'] for entry in table}
    assert {row: by_row[row] for row in ARTICLE} == ARTICLE


def test_network_variant_counts_match_keras(example, keras_counts):
    variants = example.network_variants(71, deeper=16, wider=1024)
    counts = {description: model.count_params() for description, model in variants.items()}
    expected = [keras_counts[f'network/{variant}'] for variant in ('built', 'full', 'deeper', 'wider')]
    assert list(counts.values()) == expected
    assert expected[0] == 20_861_480


def test_full_convolutions_keep_the_graph(example):
    """Only the separable convolutions change: same names, wiring and output shapes."""
    built = minixcept.Xception(include_top=False, input_shape=(71, 71, 3), middle_blocks=1)
    full = example.with_full_convolutions(built)
    assert [(node.layer.name, node.inputs) for node in full.nodes] == \
        [(node.layer.name, node.inputs) for node in built.nodes]
    assert all(full.output_shape(layer.name) == built.output_shape(layer.name) for layer in built.layers)
    kinds = {type(layer).__name__ for layer in full.layers}
    assert 'SeparableConv2D' not in kinds and 'Conv2D' in kinds


def test_the_example_prints_the_table_for_any_case(example, capsys):
    example.main(['--cin', '8', '--cout', '12', '--kernel', '5', '--size', '6', '--batch', '1', '--no-network'])
    printed = capsys.readouterr().out
    assert '8 -> 12 channels, 5x5 window' in printed
    assert f'{5 * 5 * 8 * 12:,}' in printed and f'{5 * 5 * 8 + 8 * 12:,}' in printed and '6x6x12' in printed
