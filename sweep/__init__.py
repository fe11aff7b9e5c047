"""sweep: Optuna-guided Ray Tune sweeps over SAE hyperparameters, results tables, best, export."""

__all__: list[str] = []
