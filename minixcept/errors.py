"""The two error types a user of minixcept can meet and catch."""


class ShapeError(ValueError):
    """An input or weight tensor has a shape the model cannot take.

    The message names the shape received and the shape expected.
    """


class WeightsError(ValueError):
    """A weights file cannot be loaded into the model.

    The message names the file and the first layer that does not fit. The model
    keeps the weights it had: nothing is half-loaded.
    """
