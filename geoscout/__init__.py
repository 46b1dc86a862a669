"""geoscout: where in the USA is this street view? A feature store plus lightweight heads."""

__version__ = "0.1.0"
