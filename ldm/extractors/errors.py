"""What can be wrong with an extractor's name, layer, weights tag or target kind."""
from ldm.errors import InputError


class ExtractorSpecError(InputError):
    """An extractor spec (`library:model[@layer]`), weights tag or option that cannot work; the
    message says what is valid."""


class UnknownLayerError(ExtractorSpecError):
    """`@layer` names no submodule of the model; the message lists valid names nearby."""


class TextTargetNotSupported(ExtractorSpecError):
    """A text target for a model without a text tower (or for one of its layers)."""
