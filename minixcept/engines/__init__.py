"""The engine room: the textbook's forward and backward passes rearranged for speed.

``inference.InferenceEngine`` runs a model's forward pass (behind ``Model.predict``);
``training.GradientEngine`` runs forward and backward for training. Both import the
textbook and are tested against it; the textbook never imports them.
"""
