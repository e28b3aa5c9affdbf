"""Launching a run over many devices and machines: ``--shard auto`` under SLURM and torchrun
(:mod:`.environment`) and the Ray executor of ``--ray`` (:mod:`.ray_executor`).

Both only decide which shard runs where; the run directory (atomic writes, per-shard manifests and
writer locks) stays the single source of truth, so any mix of launchers resumes the same run.
"""
