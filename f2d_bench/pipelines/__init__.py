"""Stable Diffusion 1.4 pipelines: loading real weights, and tiny or random stand-ins built locally.

- `loading`: `load_sd_pipeline` for a Hugging Face id, a local directory or the tiny model id.
- `tiny`: a tiny SD 1.4-shaped pipeline built on disk (for tests and CPU smoke runs).
- `sd14`: SD 1.4's published component configs and sampling setup, shared by `tiny` and `random_sd14`.
- `random_sd14`: full-size SD 1.4 with random weights (for GPU throughput benchmarks).
- `tokenizer`: the real CLIP BPE tokenizer files, rebuilt from open_clip's shipped vocabulary.
"""
