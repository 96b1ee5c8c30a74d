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
    """What both runners share: their model (held strongly unless kept per model), the threads
    a batch is shared out on, a buffer pool per share, and the plans kept from call to call.

    threads: how many threads run a NumPy batch, while BLAS is held to one thread (default:
    one per usable core when threadpoolctl is installed, else 1). Share i's memory comes from
    ``buffers[i]``, kept from pass to pass: fresh memory costs a page fault per page on first
    write, which on a virtual machine can take longer than the arithmetic on it.
    """

    def __init__(self, model, threads=None):
        from .kernels import BufferPool, engine_workers
        self._model_ref, self._model = weakref.ref(model), model
        self.workers = engine_workers(threads)
        self.threads = self.workers.threads
        self.buffers = [BufferPool() for _ in range(self.threads)]
        self._plans = {}                 # key -> (weights versions of the stretch, plan)

    @property
    def model(self):
        model = self._model_ref()
        if model is None:
            raise RuntimeError("this engine was kept for a model that is gone (a kept engine holds its model "
                               "weakly: keep a reference to the model while you use its engine)")
        return model

    @property
    def layers(self):
        return self.model.layers

    def let_model_go(self):
        """Hold the model only weakly from now on (for an engine kept beside it)."""
        self._model = None

    def kept_plan(self, key, start_after, stop_after, make):
        """The plan kept under ``key`` for this stretch, or ``make()`` when there is none or when
        the weights of a layer in the stretch changed since it was made (``weights_version``):
        a plan folds the weights as they are, so a kept fold is never stale."""
        first, last = self.model.stretch(start_after, stop_after)
        versions = [node.layer.weights_version for node in self.model.nodes[first:last + 1]]
        kept = self._plans.get(key)
        if kept is None or kept[0] != versions:
            kept = self._plans[key] = versions, make()
        return kept[1]
