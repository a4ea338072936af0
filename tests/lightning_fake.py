"""A stand-in for PyTorch Lightning's ModelCheckpoint callback, as found in SD v1 checkpoints."""
import contextlib
import sys
import types

PL_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
PL_NAMES = ("pytorch_lightning", "pytorch_lightning.callbacks", PL_MODULE)


@contextlib.contextmanager
def fake_lightning():
    """A ModelCheckpoint class that pickle can find by name while saving, and only then."""
    assert not any(n in sys.modules for n in PL_NAMES), "real pytorch_lightning is loaded"

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_path = "val/loss", "/logs/last.ckpt"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = PL_MODULE, "ModelCheckpoint"
    for name in PL_NAMES:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[PL_MODULE].ModelCheckpoint = ModelCheckpoint
    try:
        yield ModelCheckpoint
    finally:
        for name in PL_NAMES:
            del sys.modules[name]
