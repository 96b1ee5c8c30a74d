"""Turning photos into Xception's input."""
import numpy as np


def preprocess_input(images):
    """Scale RGB pixel values from [0, 255] to [-1, 1]: x / 127.5 - 1 (Keras's 'tf' mode, no mean subtraction).

    Accepts uint8 or float arrays of any shape ending in 3 channels; returns float32.
    """
    return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
