"""f2d-bench: the Face2Diffusion (CVPR 2024) face-personalization evaluation protocol as a tool."""

__version__ = "0.1.0"
