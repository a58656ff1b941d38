"""The detector's model: its description (the contract that ships with the weights), and the
network that the detector issue builds on it."""
from .description import (DEFAULT_MODEL, FORMAT_VERSION, ModelDescription, ModelError,
                          differences, load_checkpoint, load_description, save_checkpoint)

__all__ = ["DEFAULT_MODEL", "FORMAT_VERSION", "ModelDescription", "ModelError", "differences",
           "load_checkpoint", "load_description", "save_checkpoint"]
