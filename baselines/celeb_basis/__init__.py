"""CelebBasis on the run's base pipeline; see README.md."""
