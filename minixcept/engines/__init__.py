"""The engine room: the textbook's forward and backward passes rearranged for speed.

``inference.InferenceEngine`` runs a model's forward pass (behind ``Model.predict``);
``training.GradientEngine`` runs forward and backward for training, with the runner
interface of ``Model`` (``forward``, ``backward``, ``layers``). Both stand on
``plan.GraphPlan`` (which nodes run, who reads each tensor, when it is last read, what fuses
with what: one set of rules) and on ``kernels`` (tiles, blocks, buffer pools, threads).
``engine_for(model)`` in each keeps one engine per model. They import the textbook and are
tested against it; the textbook never imports them.
"""
import weakref


class KeptPerModel:
    """One engine of a kind per model, made on first use (``make(model)``) and kept as long as
    the model lives, with its buffer pools. A kept engine holds its model only weakly
    (``Engine.let_model_go``): otherwise the keeping would keep every model alive for good.
    So keep the model while you use its kept engine (``engine_for(Model(...))`` alone is gone
    at once)."""

    def __init__(self, make):
        self._make = make
        self._kept = weakref.WeakKeyDictionary()

    def __call__(self, model):
        engine = self._kept.get(model)
        if engine is None:
            engine = self._kept[model] = self._make(model)
            engine.let_model_go()
        return engine


class Engine:
    """What both runners share about their model: they hold it (``model``), strongly unless
    kept per model."""

    def __init__(self, model):
        self._model_ref, self._model = weakref.ref(model), model

    @property
    def model(self):
        model = self._model_ref()
        if model is None:
            raise RuntimeError("this engine was kept for a model that is gone (a kept engine holds its model "
                               "weakly: keep a reference to the model while you use its engine)")
        return model

    def let_model_go(self):
        """Hold the model only weakly from now on (for an engine kept beside it)."""
        self._model = None
