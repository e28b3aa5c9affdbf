"""DreamBooth (full UNet or LoRA) on the run's base pipeline; see README.md."""
