"""fedtina: train-once-for-all personalization (Tina) in a simulated Flower federation."""

__version__ = "0.1.0"
