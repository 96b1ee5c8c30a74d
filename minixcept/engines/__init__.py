"""The engine room: the textbook's forward and backward passes rearranged for speed.

``inference.InferenceEngine`` runs a model's forward pass (behind ``Model.predict``);
``training.GradientEngine`` runs forward and backward for training, with the runner
interface of ``Model`` (``forward``, ``backward``, ``layers``). Both stand on
``plan.GraphPlan`` (which nodes run, who reads each tensor, when it is last read, what fuses
with what: one set of rules) and on ``kernels`` (tiles, blocks, buffer pools, threads).
``engine_for(model)`` in each keeps one engine per model. They import the textbook and are
tested against it; the textbook never imports them.
"""
