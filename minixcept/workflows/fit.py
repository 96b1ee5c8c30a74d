"""A small training loop: shuffled batches, per-epoch metrics, the best epoch kept.

``fit`` trains any minixcept model (a head on bottleneck features, or a deeper
model being fine-tuned) for classification with one of minixcept's losses:

    for each epoch:
        for each shuffled batch:   logits = model.forward(x, training=True)
                                   loss.forward(logits, y);  model.backward(loss.backward())
                                   optimizer.apply_gradients(model.layers)
        evaluate on the validation data (training=False: dropout off, BN moving statistics)
    restore the weights of the epoch with the lowest validation loss

The training loss and accuracy of an epoch are averaged over its batches as they
were computed, with dropout active, as Keras reports them; the validation figures
come from a separate pass in inference mode.

A ``Model`` trains on the training engine kept for it (``fast=True``, the default:
``minixcept.engines.training``, the same numbers to float32 rounding, faster on the CPU)
or on its plain layers (``fast=False``). Anything else with ``forward``, ``backward`` and
``layers`` (a ``FineTuneModel``, an engine) trains as it is. During an epoch a line on
stderr says how far it got (batches, photos per second, time left), as Keras's fit does.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from ..engines.training import GradientEngine, engine_for
from ..layers.base import no_grad
from ..model import Model
from .progress import Progress


@dataclass
class History:
    """What ``fit`` measured.

    epochs: one dict per epoch: epoch (from 1), loss, accuracy, and, with validation data,
    val_loss and val_accuracy, plus seconds. best_epoch: the epoch (from 1) with the lowest
    validation loss (the last one without validation data), whose weights the model holds
    after ``fit`` when ``restore_best_weights`` is on; None when no epoch ended with finite
    losses. stopped: why training stopped before the last epoch (a loss that became NaN or
    infinite), or None.
    """
    epochs: list = field(default_factory=list)
    best_epoch: int = None
    stopped: str = None

    def metric(self, name):
        """One metric over the epochs, e.g. ``history.metric('val_loss')``."""
        return [epoch[name] for epoch in self.epochs]

    @property
    def best(self):
        """The best epoch's record, or None when there is none."""
        return None if self.best_epoch is None else self.epochs[self.best_epoch - 1]


def predicted_classes(outputs, loss):
    """Class indices (N,) from a model's outputs.

    outputs: (N, 1) or (N,) for a binary problem (a logit, or a probability when the loss
    is not from logits), (N, K) for K classes (logits or probabilities: the argmax is the same).
    """
    xp = backend.get_array_module(outputs)
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        threshold = 0.0 if getattr(loss, 'from_logits', False) else 0.5
        return (outputs.reshape(-1) > threshold).astype(xp.int64)
    return outputs.argmax(axis=-1)


def runner_for(model, fast=True):
    """What ``fit`` and ``evaluate`` run: for a ``Model`` with ``fast``, the training engine kept
    for it; anything else (the model with ``fast=False``, a ``FineTuneModel``, an engine) as it is."""
    return engine_for(model) if fast and isinstance(model, Model) else model


def _batch(x, y, indices):
    """One batch moved to the current backend: x as float32, y as given."""
    return backend.to_device(x[indices], np.float32), backend.to_device(y[indices])


def evaluate(model, x, y, loss, batch_size=256, fast=True):
    """Mean loss and accuracy of ``model`` on (x, y) in inference mode: ``{'loss', 'accuracy'}``.

    x: (N, ...) inputs; y: (N,) class indices, N >= 1. fast: as in ``fit``.
    """
    if len(x) == 0:
        raise ValueError('evaluate: no examples to evaluate (x is empty)')
    runner = runner_for(model, fast)         # (model stays referenced: a kept engine holds it weakly)
    total_loss, correct = 0.0, 0
    with no_grad():
        for start in range(0, len(x), batch_size):
            indices = np.arange(start, min(start + batch_size, len(x)))
            xb, yb = _batch(x, y, indices)
            outputs = runner.forward(xb, training=False)
            total_loss += float(loss.forward(outputs, yb)) * len(indices)     # loss is a batch mean
            correct += int((predicted_classes(outputs, loss) == yb.reshape(-1)).sum())
    return {'loss': total_loss / len(x), 'accuracy': correct / len(x)}


def _snapshot(model):
    return [[np.array(w, copy=True) for w in layer.get_weights()] for layer in model.layers]


def _restore(model, snapshot):
    for layer, weights in zip(model.layers, snapshot):
        if weights:
            layer.set_weights(weights)


def fit(model, x, y, loss, optimizer, epochs, batch_size=32, validation_data=None, seed=0,
        restore_best_weights=True, stop_at=None, log=print, fast=True, verbose=1, progress_stream=None,
        progress_interval=2.0):
    """Train ``model`` on (x, y); returns a History.

    x: (N, ...) inputs (an array, or anything indexable by an integer array); y: (N,) class
    indices. loss: a minixcept loss (BinaryCrossentropy for one output, SparseCategorical-
    Crossentropy for K). optimizer: SGD or Adam. validation_data: (x_val, y_val) or None.
    seed: the order of the batches, shuffled afresh each epoch; the same seed gives the same run.
    stop_at: passed to ``model.backward`` (the last layer to train, when earlier ones are frozen).
    log: called with one line per epoch (None for silence).
    fast: train a ``Model`` on the training engine kept for it (see the module docstring).
    verbose: 1 writes the progress within each epoch to ``progress_stream`` (stderr by default)
    at most every ``progress_interval`` seconds (``Progress``); 0 writes none.

    A training or validation loss that becomes NaN or infinite stops training (the weights
    diverged; more steps would only spread the NaN): ``history.stopped`` says why, and with
    ``restore_best_weights`` the model gets back the weights of its best finite epoch, or
    those it started with when no epoch ended finite.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f'fit: epochs and batch_size must be at least 1, got {epochs} and {batch_size}')
    if len(x) == 0:
        raise ValueError('fit: no training examples (x is empty)')
    runner = runner_for(model, fast)         # (model stays referenced: a kept engine holds it weakly)
    elementwise = runner.run_elementwise if isinstance(runner, GradientEngine) else None   # its threads
    order_rng = np.random.default_rng(seed)
    history, best_loss = History(), np.inf
    best_snapshot = _snapshot(model) if restore_best_weights else None     # the start, until an epoch beats it
    n_batches = max(1, -(-len(x) // batch_size))
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        total_loss, correct, seen = 0.0, 0, 0
        progress = (Progress(progress_stream or sys.stderr, epoch, epochs, n_batches, len(x), progress_interval)
                    if verbose else None)
        for done, batch_indices in enumerate(np.array_split(order_rng.permutation(len(x)), n_batches), 1):
            xb, yb = _batch(x, y, batch_indices)
            outputs = runner.forward(xb, training=True)
            batch_loss = float(loss.forward(outputs, yb))
            if not math.isfinite(batch_loss):       # diverged: more steps only spread the NaN
                history.stopped = f'the training loss became {batch_loss} in epoch {epoch}'
                break
            total_loss += batch_loss * len(batch_indices)
            correct += int((predicted_classes(outputs, loss) == yb.reshape(-1)).sum())
            runner.backward(loss.backward(), stop_at=stop_at)
            optimizer.apply_gradients(runner.layers, run=elementwise)
            seen += len(batch_indices)
            if progress is not None:
                progress.update(done, seen)
        if progress is not None:
            progress.finish(n_batches, seen)
        if history.stopped:
            break
        record = {'epoch': epoch, 'loss': total_loss / len(x), 'accuracy': correct / len(x)}
        if validation_data is not None:
            scores = evaluate(model, *validation_data, loss, fast=fast)
            record.update(val_loss=scores['loss'], val_accuracy=scores['accuracy'])
        record['seconds'] = time.monotonic() - started
        history.epochs.append(record)
        if not math.isfinite(record.get('val_loss', 0.0)):
            history.stopped = f"the validation loss became {record['val_loss']} after epoch {epoch}"

        # without validation data every finite epoch is the best so far: the last one is kept
        improved = not history.stopped and record.get('val_loss', -np.inf) < best_loss
        if improved:
            best_loss, history.best_epoch = record.get('val_loss', best_loss), epoch
            if restore_best_weights:
                best_snapshot = _snapshot(model)
        if log is not None:
            log(_epoch_line(record, epochs, improved and validation_data is not None))
        if history.stopped:
            break
    if history.stopped and log is not None:
        kept = f'epoch {history.best_epoch}' if history.best_epoch else 'the start (no epoch ended finite)'
        log(f'stopped: {history.stopped}; the weights are those of {kept}')
    if restore_best_weights and (history.stopped or validation_data is not None):
        _restore(model, best_snapshot)
    return history


def _epoch_line(record, epochs, best_so_far):
    line = (f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
            f"loss {record['loss']:.4f}  accuracy {record['accuracy']:.4f}")
    if 'val_loss' in record:
        line += f"  val_loss {record['val_loss']:.4f}  val_accuracy {record['val_accuracy']:.4f}"
    line += f"  ({record['seconds']:.1f}s)"
    return line + ('  *' if best_so_far else '')
