"""The per-face tuning stage: artifacts kept in the run (``artifacts``), the denoising loss the methods
train with (``diffusion``), and the step that tunes a face when a command first needs it (``stage``)."""
