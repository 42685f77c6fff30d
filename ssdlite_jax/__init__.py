"""ssdlite-jax: torchvision's SSDlite detector in JAX/Flax, with weight parity."""

__version__ = "0.1.0"
