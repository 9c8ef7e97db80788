"""edgeknn: a teachable image classifier for Raspberry Pi-class boards."""

__version__ = "0.1.0"
