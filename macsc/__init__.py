"""MaCSC: multimodal-augmented PLMs via conceptual prototypes and self-balancing calibration."""

__version__ = "0.1.0"
