"""IP-Adapter-FaceID (plain, Plus, PlusV2) on a private copy of the base pipeline's UNet; see README.md."""
