"""Training and evaluation of the detector: targets, losses, the training loop and the
evaluation metrics (:mod:`.evaluate`). Uses ``model``, ``boxes`` and ``sim``; the core never
imports this package."""
