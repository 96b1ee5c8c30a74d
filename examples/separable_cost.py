"""What a depthwise separable convolution saves, counted and timed with minixcept's own layers.

    python examples/separable_cost.py [--cin 16] [--cout 32] [--kernel 3] [--size 64] [--batch 8]
        [--network-size 150] [--network-batch 2] [--no-network] [--backend numpy|cupy]

1. one layer   from C_in to C_out channels with a k x k window ('same' padding, stride 1,
               no bias) on an M x M input, five ways:
                 full convolution             k*k*C_in*C_out weights
                 factorised (Inception v3)    1 x k (C_in -> C_in), then k x 1 (C_in -> C_out)
                 pointwise, then depthwise    C_in*C_out + k*k*C_out (the order of the article)
                 depthwise, then pointwise    k*k*C_in + C_in*C_out (Keras's, Xception's)
                 factorised depthwise, then pointwise: both ideas at once
               each with its weights, multiply-adds, output shape and the measured time of a
               forward and a backward pass on the current backend. For 16 -> 32 with 3 x 3:
               4,608 / 2,304 / 800 / 656 / 608 weights.
2. the network Xception without its top as built (20,861,480 parameters), the same graph
               with every separable convolution replaced by a full one, a deeper middle flow
               (middle_blocks) and a wider one (middle_width): parameters, multiply-adds and
               seconds per photo for a forward pass.

Every count comes from the layer objects (``count_params``, ``multiply_adds``); the tests
check the 16 -> 32 rows and the network's total against Keras's count_params().
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # run from a fresh clone without installing

import numpy as np  # noqa: E402

import minixcept  # noqa: E402
from minixcept import layers  # noqa: E402
from minixcept.workflows import cli  # noqa: E402

ROWS = ('full', 'factorised', 'pointwise_depthwise', 'depthwise_pointwise', 'factorised_depthwise')
TITLES = {'full': 'full convolution', 'factorised': 'factorised 1xk, kx1', 'pointwise_depthwise':
          'pointwise, depthwise', 'depthwise_pointwise': 'depthwise, pointwise', 'factorised_depthwise':
          'depthwise 1xk, kx1, pointwise'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Weights, multiply-adds and time of separable convolutions.')
    parser.add_argument('--cin', type=cli.positive_int, default=16, help='input channels')
    parser.add_argument('--cout', type=cli.positive_int, default=32, help='output channels')
    parser.add_argument('--kernel', type=cli.positive_int, default=3, help='side of the window')
    parser.add_argument('--size', type=cli.positive_int, default=64,
                        help='side M of the M x M input of the one-layer table')
    parser.add_argument('--batch', type=cli.positive_int, default=8,
                        help='inputs per timed pass in the one-layer table')
    parser.add_argument('--network-size', type=cli.image_size, default=150,
                        help='photo side for the network table (>= 71)')
    parser.add_argument('--network-batch', type=cli.positive_int, default=2, help='photos per timed network pass')
    parser.add_argument('--deeper', type=cli.positive_int, default=16,
                        help='middle_blocks of the deeper variant (paper: 8)')
    parser.add_argument('--wider', type=cli.positive_int, default=1024,
                        help='middle_width of the wider variant (paper: 728)')
    parser.add_argument('--no-network', action='store_true', help='only the one-layer table')
    parser.add_argument('--backend', choices=('numpy', 'cupy'), default='numpy')
    return parser.parse_args(argv)


# -- 1. one layer, five ways ---------------------------------------------------------------------

def layer_stacks(c_in, c_out, kernel):
    """{row: the layers that take c_in channels to c_out with a kernel x kernel window}."""
    k = kernel
    return {
        'full': [layers.Conv2D(c_out, k, padding='same', use_bias=False)],
        'factorised': [layers.Conv2D(c_in, (1, k), padding='same', use_bias=False),
                       layers.Conv2D(c_out, (k, 1), padding='same', use_bias=False)],
        'pointwise_depthwise': [layers.PointwiseConv2D(c_out),
                                layers.DepthwiseConv2D(k, padding='same', use_bias=False)],
        'depthwise_pointwise': [layers.SeparableConv2D(c_out, k, padding='same', use_bias=False)],
        'factorised_depthwise': [layers.DepthwiseConv2D((1, k), padding='same', use_bias=False),
                                 layers.DepthwiseConv2D((k, 1), padding='same', use_bias=False),
                                 layers.PointwiseConv2D(c_out)],
    }


def seconds(work, repeats=3):
    """The fastest of ``repeats`` runs of work() (the least disturbed by anything else running).
    Reading one number of the result back waits for a GPU to finish."""
    best = float('inf')
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        float(minixcept.asnumpy(result.ravel()[:1])[0])
        best = min(best, time.perf_counter() - started)
    return best


def layer_costs(c_in, c_out, kernel, size, batch, timed=True, seed=0):
    """[{row, weights, multiply_adds, output_shape, forward_s, backward_s}] for each way."""
    minixcept.set_seed(seed)
    rng = np.random.default_rng(seed)
    x = minixcept.to_device(rng.standard_normal((batch, size, size, c_in)), np.float32)
    table = []
    for row, stack in layer_stacks(c_in, c_out, kernel).items():
        model = minixcept.Sequential(stack, input_shape=(size, size, c_in), name=row)
        entry = {'row': row, 'weights': model.count_params(), 'multiply_adds': model.multiply_adds(),
                 'output_shape': model.output_shape()[1:]}
        if timed:
            y = model.forward(x)
            dy = minixcept.to_device(rng.standard_normal(y.shape), np.float32)
            entry['forward_s'] = seconds(lambda: model.forward(x), repeats=5)
            entry['backward_s'] = seconds(lambda: model.backward(dy), repeats=5)
        table.append(entry)
    return table


def print_layer_table(table, args):
    print(f'\nOne layer: {args.cin} -> {args.cout} channels, {args.kernel}x{args.kernel} window, '
          f"'same' padding, no bias, input {args.size}x{args.size}x{args.cin}, batch of {args.batch}, "
          f'{minixcept.backend.current()}')
    print(f"{'':32}{'weights':>9}{'mult-adds':>13}  {'output':<14}{'forward ms':>11}{'backward ms':>12}")
    for entry in table:
        shape = 'x'.join(map(str, entry['output_shape']))
        print(f"{TITLES[entry['row']]:32}{entry['weights']:>9,}{entry['multiply_adds']:>13,}  {shape:<14}"
              f"{1000 * entry['forward_s']:>11.2f}{1000 * entry['backward_s']:>12.2f}")


# -- 2. the whole network ------------------------------------------------------------------------

def with_full_convolutions(model):
    """The same graph with every SeparableConv2D replaced by a Conv2D of the same filters, window,
    strides and padding (the other layers are shared with ``model``)."""
    rebuilt = minixcept.Model(model.input_shape, name=f'{model.name}_full')
    for node in model.nodes:
        layer = node.layer
        if isinstance(layer, layers.SeparableConv2D):
            layer = layers.Conv2D(layer.filters, layer.kernel_size, layer.strides, layer.padding,
                                  use_bias=layer.use_bias, name=layer.name)
        rebuilt.add(layer, *node.inputs)
    return rebuilt


def network_variants(size, deeper, wider):
    """{description: model}, each Xception without its top at size x size."""
    shape = (size, size, 3)
    built = minixcept.Xception(include_top=False, input_shape=shape)
    return {
        'Xception as built (8 x 728)': built,
        'every separable conv full': with_full_convolutions(built),
        f'middle_blocks={deeper}': minixcept.Xception(include_top=False, input_shape=shape, middle_blocks=deeper),
        f'middle_width={wider}': minixcept.Xception(include_top=False, input_shape=shape, middle_width=wider),
    }


def network_costs(size, batch, deeper, wider, seed=0):
    """[(description, parameters, multiply-adds per photo, seconds per photo)] for each variant."""
    minixcept.set_seed(seed)
    rng = np.random.default_rng(seed)
    x = minixcept.to_device(rng.uniform(-1, 1, (batch, size, size, 3)), np.float32)
    rows = []
    for description, model in network_variants(size, deeper, wider).items():
        print(f'  timing {description} ...', flush=True)
        with minixcept.no_grad():
            model.forward(x)                                    # first pass: memory, caches
            per_photo = seconds(lambda: model.forward(x), repeats=2) / batch
        rows.append((description, model.count_params(), model.multiply_adds(), per_photo))
    return rows


def print_network_table(rows, size, batch):
    print(f'\nThe network without its top at {size}x{size} (multiply-adds per photo; forward pass, '
          f'plain layers, batch of {batch}, {minixcept.backend.current()})')
    print(f"{'':30}{'parameters':>13}{'mult-adds':>17}{'s / photo':>11}")
    for description, parameters, multiply_adds, per_photo in rows:
        print(f'{description:30}{parameters:>13,}{multiply_adds:>17,}{per_photo:>11.3f}')


def main(argv=None):
    args = parse_args(argv)
    minixcept.use(args.backend)
    print_layer_table(layer_costs(args.cin, args.cout, args.kernel, args.size, args.batch), args)
    if not args.no_network:
        print_network_table(network_costs(args.network_size, args.network_batch, args.deeper, args.wider),
                            args.network_size, args.network_batch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
