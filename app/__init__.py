"""An inference service for handwritten digits: FastAPI in front of a PyTorch MLP."""

__version__ = "0.1.0"
