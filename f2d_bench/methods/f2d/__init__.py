"""Face2Diffusion (Shiohara & Yamasaki, CVPR 2024) as a generation method.

- `msid`: the MSID identity encoder (a timm ViT reading the CLS token after four blocks), 1536-d.
- `mapping`: the mapping network, identity (+ expression) features -> two word embeddings S1*, S2*.
- `checkpoints`: where the official files are published, strict loading with clear errors.
- `injection`: a forward hook that writes S1*, S2* into the text encoder's embedding output.
- `method`: `F2DMethod`, registered as ``f2d``.

Facts about the official inference come from PROTOCOL.md section 4; no official code is copied.
"""
