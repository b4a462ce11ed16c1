"""The one error every conversion raises for a checkpoint it cannot convert faithfully."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: the message names the bad value and what was expected."""
