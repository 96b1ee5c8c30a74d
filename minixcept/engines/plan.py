"""The graph plan both engines run on: which nodes run, who reads each tensor, when it is last
read, and what fuses with what.

The facts about the graph come from the textbook model itself (``Model.stretch``,
``Model.readers``, ``Model.last_use``: the same ones ``Model.forward`` and ``Model.backward``
use), so the engines and the plain layers cannot disagree about them. On top of them this
module states the one set of fusion rules; each engine says only which convolutions its
kernels can take a neighbour into (``Kernels``):

- a ReLU whose output only a convolution reads runs inside that convolution, applied as the
  convolution copies its input rows (*leading ReLU*);
- a batch-norm on its moving statistics that alone reads a convolution's output folds into
  the convolution's kernel and bias (``minixcept.layers.normalization.fold_batch_norm`` has
  the algebra); on batch statistics (training a trainable batch-norm) it never folds;
- a ReLU that alone reads that output runs on it in place (*trailing ReLU*), unless it
  already runs inside a later convolution.

A fused layer's output is never stored, so a tensor that must stay visible (the stretch's
output, a captured layer) is never fused away: its readers do not take it in.
"""
from dataclasses import dataclass

from ..layers import Activation, BatchNormalization, Conv2D, DepthwiseConv2D, PointwiseConv2D, SeparableConv2D

CONVOLUTIONS = (Conv2D, SeparableConv2D, DepthwiseConv2D, PointwiseConv2D)


def is_relu(layer):
    return isinstance(layer, Activation) and layer.activation == 'relu'


def folds_in_this_mode(batch_norm, training):
    """Whether a batch-norm runs on its moving statistics in this mode (a constant affine map)."""
    return not (training and batch_norm.trainable)


@dataclass
class Kernels:
    """What an engine's kernels can take into a convolution, each a test on the layer."""
    leading_relu: object          # layer -> bool: runs a ReLU on its input rows
    batch_norm: object            # layer -> bool: takes a folded batch-norm
    trailing_relu: object         # layer -> bool: runs a ReLU on its output


@dataclass
class Fusion:
    """A convolution with the neighbours fused into it (nodes, or None)."""
    conv: object
    leading_relu: object = None
    batch_norm: object = None
    relu: object = None

    @property
    def inputs(self):
        """What the fused step reads: the leading ReLU's input, else the convolution's."""
        return (self.leading_relu or self.conv).inputs

    @property
    def output(self):
        """The name of the tensor the fused step writes: that of its last layer."""
        return (self.relu or self.batch_norm or self.conv).layer.name


class GraphPlan:
    """The stretch of ``model`` from after ``start_after`` to ``stop_after`` (whole by default),
    in ``training`` mode, with the tensors in ``keep`` (and the stretch's output) kept visible.

    nodes: the nodes that run, in order; positions: their positions in ``model.nodes``;
    start: the name of the tensor the stretch reads ('input' or ``start_after``); output: the
    name of the tensor it returns; readers: {tensor: [positions of the nodes reading it]};
    last_use: {tensor: position of its last reader} (``Model.last_use``).
    """

    def __init__(self, model, training=False, keep=(), start_after=None, stop_after=None):
        self.training = training
        self.all_nodes = model.nodes             # not the model: an engine keeps plans, not its model
        self.first, self.last = model.stretch(start_after, stop_after)
        self.nodes = model.nodes[self.first:self.last + 1]
        self.positions = range(self.first, self.last + 1)
        self.start = start_after or 'input'
        self.output = self.nodes[-1].layer.name
        self.readers = model.readers(self.first, self.last)
        self.last_use = model.last_use(self.first, self.last)
        self.keep = set(keep) | {self.output}

    def sole_reader(self, name, kind=object):
        """The node of type ``kind`` that alone reads tensor ``name`` (not kept), or None."""
        reading = self.readers.get(name, [])
        if name in self.keep or len(reading) != 1:
            return None
        reader = self.all_nodes[reading[0]]
        return reader if isinstance(reader.layer, kind) else None

    def fusions(self, kernels):
        """({convolution name: Fusion}, {names of the layers fused away}) under the rules of
        the module docstring, for an engine whose kernels take what ``kernels`` says."""
        leading = {}
        for node in self.nodes:
            reader = self.sole_reader(node.layer.name, CONVOLUTIONS)
            if is_relu(node.layer) and reader is not None and kernels.leading_relu(reader.layer):
                leading[reader.layer.name] = node
        absorbed = {node.layer.name for node in leading.values()}
        fused = {}
        for node in self.nodes:
            layer = node.layer
            if not isinstance(layer, CONVOLUTIONS) or layer.name in absorbed:
                continue
            batch_norm = self.sole_reader(layer.name, BatchNormalization)
            if batch_norm is not None and not (kernels.batch_norm(layer)
                                               and folds_in_this_mode(batch_norm.layer, self.training)):
                batch_norm = None
            relu = self.sole_reader((batch_norm or node).layer.name, Activation)
            if relu is not None and (not is_relu(relu.layer) or relu.layer.name in absorbed
                                     or not kernels.trailing_relu(layer)):
                relu = None
            fusion = Fusion(node, leading.get(layer.name), batch_norm, relu)
            if fusion.leading_relu or fusion.batch_norm or fusion.relu:
                fused[layer.name] = fusion
                absorbed.update(n.layer.name for n in (batch_norm, relu) if n is not None)
        return fused, absorbed
