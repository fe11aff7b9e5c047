"""trainer: SAE models, their configs, metrics, save/load/export and the training loop."""

__all__: list[str] = []
