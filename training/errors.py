"""The training app's error for requests it cannot do: the message says what to fix."""


class TrainingError(ValueError):
    """Bad request for training: the message says what to fix."""
