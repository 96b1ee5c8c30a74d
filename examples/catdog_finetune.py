"""Cats vs dogs, second stage: fine-tune Xception's last block together with the trained head.

The last recipe of "Building powerful image classification models using very little
data" (F. Chollet, the Keras blog, 2016), with Xception in place of VGG16. It starts where
``catdog_bottleneck.py`` stopped, with a head trained on frozen bottleneck features:

1. load      the train and validation photos, resized as Keras's ``load_img`` does;
2. build     Xception with the ImageNet weights and, on top, the head that
             catdog_bottleneck.py saved (``--head``);
3. freeze    every layer before the first layer of ``--train-from`` (block14 by default;
             block1 trains everything): frozen layers keep their weights, and their
             batch-norm runs on its moving statistics, as Keras's ``trainable = False``;
4. cache     the frozen part's output for every validation photo (and, with
             ``--no-augment``, every training photo): it never changes;
5. train     with a small learning rate (SGD 1e-4, momentum 0.9, as the write-up), each
             training photo randomly flipped, turned, sheared, zoomed and shifted
             (minixcept.files.augment); the frozen part runs under no_grad, the backward pass stops
             at the first trainable layer; the epoch with the lowest validation loss is kept.
             Trainable batch-norm layers keep their moving statistics, as Keras's
             transfer-learning guide recommends; ``--bn-statistics batch`` normalises with each
             batch's statistics instead, as Keras's model(x, training=True) does (see
             minixcept.workflows.finetune for why that loses accuracy here). The base runs on
             the engines (``--no-fast``: on its plain layers, the same numbers, slower), and a
             line on stderr shows each epoch's progress;
6. save      the fine-tuned base (HDF5, the layout ``Xception(weights=PATH)`` reads) and head;
7. check     reload both files into a fresh model and measure the validation accuracy again;
8. report    a JSON report (before and after) and a PNG of the training curves.

    python examples/catdog_finetune.py [--head runs/catdog/head.h5] [--train-from block14]
        [--augment | --no-augment] [--bn-statistics moving|batch] [--fast | --no-fast] [--optimizer sgd|adam]
        [--learning-rate 1e-4] [--epochs N] [--data DIR] [--image-size N] [--batch-size N]
        [--backend numpy|cupy] [--weights PATH] [--seed N] [--limit N] [--out DIR]
        [--report FILE.json] [--show-augmentations]

``--show-augmentations`` only writes OUT/augmentations.png (4 photos, each with 6 random
augmentations) to look at what the network is fed, and stops.

On the CPU the frozen part dominates: at 299 px a photo costs about a seventh of a
second through it (the fast inference engine), a training step of block 14 and the head
a few hundredths. Without augmentation its output is computed once per photo and the
epochs are quick; with augmentation every epoch pays for it again
(benchmarks/finetune_epoch.py times one epoch on the engines against the plain layers). On a GPU (``--backend cupy``) the whole network can train (``--train-from block1``).

What it gave on the shared cats and dogs (2,000 training and 1,974 validation photos, 299 px,
block 14 and the head, SGD 1e-4, batch 16, 3 augmented epochs, 2 shared CPU cores, about
30 minutes each, before the training engine): starting from the bottleneck head's 99.14%
(val_loss 0.0247), ``--bn-statistics batch`` dropped to 98.63% after the first epoch and
climbed back to 98.99% (0.0316) by the third; the moving statistics, now the default, held
99.14% (0.0246). The write-up trained for 50 epochs.
"""
import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minixcept
from minixcept.files.augment import save_augmentation_grid
from minixcept.backend import BackendError
from minixcept.errors import WeightsError
from minixcept.workflows.finetune import FineTuneModel, FrozenFeatureFeed, cache_frozen_features
from minixcept.files.images import DatasetLayoutError
from minixcept.xception import preprocess_input
from minixcept.files.atomic import WriteError, write_atomically
from minixcept.files.paths import OutputPathError, check_output_paths, check_path_relations
from minixcept.workflows import cli
from minixcept.workflows.catdog import DEFAULT_DATA, DEFAULT_OUT as BOTTLENECK_OUT
from minixcept.workflows.catdog import FINETUNE_AUGMENTATION as AUGMENTATION
from minixcept.workflows.catdog import (RANDOM_WEIGHTS, build_base, check_base, check_classes, get_weights,
                                        head_loss, load_head, load_photos, load_pixels, make_optimizer,
                                        save_head_files)
from minixcept.files.cache import weights_checksum
from minixcept.workflows.plot import plot_history
from minixcept.workflows.fit import evaluate, fit, predicted_classes

DEFAULT_OUT = BOTTLENECK_OUT / 'finetune'


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default: "(default: VALUE)" after its help, or, for one
    worked out at run time (None here), the help's own "(default: ...)" in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune Xception's top block(s) and the bottleneck head on cats and dogs.",
        formatter_class=HelpWithDefaults)
    parser.add_argument('--head', type=Path, default=BOTTLENECK_OUT / 'head.h5',
                        help='the head catdog_bottleneck.py saved (head.json beside it)')
    parser.add_argument('--train-from', default='block14',
                        help='first block to train; every layer before it is frozen (block1: train all)')
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                        help='random flips, turns, shears, zooms and shifts of the training photos')
    parser.add_argument('--show-augmentations', action='store_true',
                        help='only write OUT/augmentations.png (4 photos x 6 augmentations, at 299 px '
                             'unless --image-size says otherwise) and stop')
    parser.add_argument('--bn-statistics', choices=('moving', 'batch'), default='moving',
                        help="trainable batch-norm layers keep their moving statistics (the base in inference "
                             "mode, as Keras's transfer-learning guide does) or normalise with each batch's "
                             "statistics (Keras's trainable=True called with training=True)")
    parser.add_argument('--fast', action=argparse.BooleanOptionalAction, default=True,
                        help='run the base on the engines, or on its plain layers (--no-fast: the same '
                             'numbers, slower)')
    parser.add_argument('--optimizer', choices=('sgd', 'adam'), default='sgd',
                        help='SGD with momentum 0.9 (the write-up) or Adam')
    parser.add_argument('--learning-rate', type=cli.positive_float, default=1e-4,
                        help="the optimizer's learning rate")
    # 3: the README's and RESULTS.md's fine-tuning figures (99.14 %, 1,840 s) were measured with 3
    parser.add_argument('--epochs', type=cli.positive_int, default=3,
                        help='passes over the training photos (the epoch with the lowest validation loss is kept)')
    parser.add_argument('--data', type=Path, default=None,
                        help='folder with train/ and validation/, one subfolder per class '
                             '(default: the shared catdog photos beside the repository)')
    parser.add_argument('--image-size', type=cli.image_size, default=None,
                        help='side of the square model input (default: the size the head was trained at)')
    parser.add_argument('--batch-size', type=cli.positive_int, default=16, help='photos per training step')
    parser.add_argument('--backend', choices=('numpy', 'cupy'), default=None,
                        help='where the arrays live (default: $MINIXCEPT_BACKEND, else numpy)')
    parser.add_argument('--weights', type=cli.weights_file, default=None,
                        help='Xception notop weights the head was trained on (default: fetched into weights/)')
    parser.add_argument('--seed', type=cli.non_negative_int, default=0,
                        help='batch order, augmentations and dropout')
    parser.add_argument('--limit', type=cli.positive_int, default=None,
                        help='use only the first N photos per class per split (default: every photo)')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT,
                        help='folder for the fine-tuned weights, the report and the curves')
    parser.add_argument('--report', type=Path, default=None, help='JSON report (default: OUT/report.json)')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = DEFAULT_DATA if DEFAULT_DATA.is_dir() else None
    args.report = args.report or args.out / 'report.json'
    return args


def log(line):
    print(line, flush=True)


# -- 1. load -------------------------------------------------------------------------------------

# -- 2. build, 3. freeze -------------------------------------------------------------------------

def build_network(weights, head, image_size, train_from, bn_statistics, seed, fast=True):
    """Xception with ``weights`` + the trained head, frozen before the first layer of ``train_from``."""
    base = build_base(weights, image_size, seed)
    network = FineTuneModel(base, head, train_from, fast=fast, bn_statistics=bn_statistics)
    frozen = sum(not layer.trainable for layer in base.layers)
    log(f'training from {network.first_trainable!r}: {frozen} of {len(base.layers)} base layers frozen, '
        f'{network.count_trainable_params():,} weights to train '
        f'(input: the output of {network.frozen_output or "nothing: the images"})')
    return network


# -- 4. cache, 5. train ----------------------------------------------------------------------------

def training_input(network, pixels, augment, seed, batch_size):
    """What fit() trains on: photos augmented and run through the frozen part batch by batch,
    or, without augmentation, the frozen part's output cached once."""
    if augment:
        return FrozenFeatureFeed(network, pixels, rng=np.random.default_rng(seed), settings=AUGMENTATION)
    log('caching the frozen part for the training photos')
    return cache_frozen_features(network, pixels, batch_size, log=log)


def fine_tune(network, x_train, y_train, x_val, y_val, args, loss):
    started = time.monotonic()
    history = fit(network, x_train, y_train, loss,
                  make_optimizer(args.optimizer, args.learning_rate), epochs=args.epochs,
                  batch_size=args.batch_size, validation_data=(x_val, y_val), seed=args.seed,
                  stop_at=network.first_trainable, log=log)
    seconds = time.monotonic() - started
    if history.best is not None:
        log(f'best epoch {history.best_epoch}: val_loss {history.best["val_loss"]:.4f}  '
            f'val_accuracy {history.best["val_accuracy"]:.4f}  (fine-tuning took {seconds:.1f} s)')
    return history, seconds


# -- 6. save, 7. check -----------------------------------------------------------------------------

def save_finetuned(network, description, out_dir):
    """xception_finetuned.h5 (the whole base) and head_finetuned.h5 + head_finetuned.json (tied
    to each other as the bottleneck example ties its head, save_head_files)."""
    base_file, head_file = out_dir / 'xception_finetuned.h5', out_dir / 'head_finetuned.h5'
    write_atomically(base_file, network.base.save_weights)
    with tempfile.TemporaryDirectory() as scratch:              # the digest predict checks the base against
        base_id = 'sha256:' + weights_checksum(base_file, scratch)
    save_head_files(network.head, dict(description, base_weights=base_id, base_file=str(base_file),
                                       fine_tuned_from=network.train_from), head_file)
    log(f'saved {base_file} and {head_file}')
    return base_file, head_file


def reload_and_evaluate(base_file, head_file, image_size, val_pixels, y_val, loss, batch_size):
    """Validation scores of a fresh Xception + head loaded from the saved files, photo to logit
    through ``predict`` (the library's inference path), and the logits themselves."""
    started = time.monotonic()
    head, _ = load_head(head_file)
    base = build_base(base_file, image_size, seed=0)
    logits = np.concatenate([head.predict(base.predict(preprocess_input(val_pixels[start:start + batch_size])))
                             for start in range(0, len(val_pixels), batch_size)])
    scores = scores_of(logits, y_val, loss)
    log(f'reloaded from {base_file.name} + {head_file.name}: val_loss {scores["loss"]:.4f}  '
        f'val_accuracy {scores["accuracy"]:.4f}  ({time.monotonic() - started:.1f} s)')
    return scores, logits


def scores_of(logits, labels, loss):
    """{'loss', 'accuracy'} of known logits, as training.evaluate reports a model's."""
    return {'loss': float(loss.forward(logits, labels)),
            'accuracy': float(np.mean(predicted_classes(logits, loss) == labels))}


def network_logits(network, x, batch_size=256):
    """The fine-tuned network's logits for cached frozen-part outputs x, in inference mode."""
    with minixcept.no_grad():
        return np.concatenate([minixcept.asnumpy(network.forward(minixcept.to_device(x[start:start + batch_size]),
                                                                 training=False))
                               for start in range(0, len(x), batch_size)])


# -- 8. report -------------------------------------------------------------------------------------

def bottleneck_val_accuracy(head_file):
    """The head's validation accuracy as catdog_bottleneck.py reported it, if its report is there."""
    report = Path(head_file).parent / 'report.json'
    try:
        return json.loads(report.read_text()).get('val_accuracy')
    except (OSError, ValueError, AttributeError):      # none, unreadable or not a report: not worth a stop
        return None


def write_report(args, network, image_size, counts, before, history, after, reloaded, timings, files):
    report = {
        'val_accuracy_before': before['accuracy'], 'val_loss_before': before['loss'],
        'val_accuracy': after['accuracy'], 'val_loss': after['loss'],
        'reloaded_val_accuracy': reloaded.get('accuracy'), 'reloaded_val_loss': reloaded.get('loss'),
        'reloaded_max_logit_difference': reloaded.get('max_logit_difference'),
        'bottleneck_report_val_accuracy': bottleneck_val_accuracy(args.head),
        'n_train': counts['train'], 'n_val': counts['validation'],
        'train_from': args.train_from, 'first_trainable_layer': network.first_trainable,
        'frozen_output': network.frozen_output, 'trainable_params': network.count_trainable_params(),
        'bn_statistics': args.bn_statistics, 'fast': args.fast,
        'augment': args.augment, 'augmentation': dataclasses.asdict(AUGMENTATION) if args.augment else None,
        'optimizer': (f'SGD(learning_rate={args.learning_rate}, momentum=0.9)' if args.optimizer == 'sgd'
                      else f'Adam(learning_rate={args.learning_rate})'),
        'epochs': len(history.epochs), 'best_epoch': history.best_epoch, 'history': history.epochs,
        'stopped': history.stopped,
        'image_size': image_size, 'batch_size': args.batch_size, 'seed': args.seed,
        'limit_per_class': args.limit, 'backend': minixcept.backend.current(),
        'seconds': {name: round(value, 1) for name, value in timings.items()},
        'head': str(args.head), **{name: path and str(path) for name, path in files.items()},
    }
    cli.write_json(args.report, report)
    log(f'report: {args.report}')
    return report


def show_augmentations(args, image_size):
    """Write OUT/augmentations.png: two cats and two dogs, each with six random augmentations."""
    train = load_photos(args.data, limit=2)['train']
    pixels, _ = load_pixels(train, image_size)
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_augmentation_grid(args.out / 'augmentations.png', pixels, np.random.default_rng(args.seed),
                                  per_photo=6, settings=AUGMENTATION)
    log(f'augmentations: {path}')
    return 0


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    try:
        cli.use_backend(args.backend)
        check_output_paths(folders={'--out folder': args.out}, files={'--report file': args.report})
        check_path_relations(
            outputs={'--report file': args.report, 'fine-tuned base': args.out / 'xception_finetuned.h5',
                     'fine-tuned head': args.out / 'head_finetuned.h5',
                     'fine-tuned head description': args.out / 'head_finetuned.json',
                     'training curves': args.out / 'curves.png',
                     'augmentation picture': args.out / 'augmentations.png'},
            photo_folders={'--data folder': args.data} if args.data is not None else {},
            inputs={'--head file': args.head, 'head description': args.head.with_suffix('.json'),
                    **({'--weights file': args.weights} if args.weights not in (None, RANDOM_WEIGHTS) else {})})
        if args.show_augmentations:
            return show_augmentations(args, args.image_size or 299)
        head, description = load_head(args.head)
        image_size = args.image_size or description['image_size']
        splits = load_photos(args.data, args.limit)
        check_classes(description, args.head, splits['train'], args.data)
        cli.check_batch_memory(image_size, args.batch_size, max(len(folder) for folder in splits.values()))
        weights = get_weights(args.weights)
        check_base(description, weights, args.head)
        network = build_network(weights, head, image_size, args.train_from, args.bn_statistics, args.seed,
                                args.fast)
        return fine_tune_and_report(args, network, splits, description, image_size, started)
    except DatasetLayoutError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except (WeightsError, BackendError, minixcept.ShapeError, ValueError, OutputPathError, cli.RunError,
            WriteError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\ninterrupted: nothing was saved', file=sys.stderr)
        return 130


def fine_tune_and_report(args, network, splits, description, image_size, started):
    """Steps 4 to 8; the exit code: 0, or 1 when training stopped on a loss that was not finite."""
    loss = head_loss(len(description['class_names']))
    train_pixels, y_train = load_pixels(splits['train'], image_size)
    val_pixels, y_val = load_pixels(splits['validation'], image_size)

    timings = {}
    log('caching the frozen part for the validation photos')
    x_val = cache_frozen_features(network, val_pixels, args.batch_size, log=log)
    x_train = training_input(network, train_pixels, args.augment, args.seed, args.batch_size)
    timings['caching'] = time.monotonic() - started
    before = evaluate(network, x_val, y_val, loss)
    log(f'before fine-tuning (the bottleneck head): val_loss {before["loss"]:.4f}  '
        f'val_accuracy {before["accuracy"]:.4f}')

    history, timings['fine_tuning'] = fine_tune(network, x_train, y_train, x_val, y_val, args, loss)
    after_logits = network_logits(network, x_val)
    after = scores_of(after_logits, y_val, loss)

    # after a stop, the weights are the best finite epoch's: saved only if they beat the start
    keep = not history.stopped or (history.best is not None and history.best['val_loss'] < before['loss'])
    files, reloaded = {'base_file': None, 'head_file': None}, {}
    if keep:
        base_file, head_file = save_finetuned(network, description, args.out)
        reloaded, reloaded_logits = reload_and_evaluate(base_file, head_file, image_size, val_pixels, y_val, loss,
                                                        args.batch_size)
        reloaded['max_logit_difference'] = float(np.abs(reloaded_logits - after_logits).max())
        files = {'base_file': base_file, 'head_file': head_file}
    args.out.mkdir(parents=True, exist_ok=True)
    files['curves_file'] = (plot_history(history, args.out / 'curves.png',
                                         title=f'fine-tuning from {args.train_from}'
                                               f'{" on augmented photos" if args.augment else ""}')
                            if history.epochs else None)
    timings['total'] = time.monotonic() - started
    write_report(args, network, image_size, {'train': len(y_train), 'validation': len(y_val)}, before, history,
                 after, reloaded, timings, files)
    if history.stopped:
        print(f'error: fine-tuning stopped, {history.stopped}; '
              + (f'saved the weights of epoch {history.best_epoch}' if keep
                 else 'nothing saved: no epoch beat the starting weights'), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
