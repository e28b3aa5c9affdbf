"""Scoring a run: the face stage, one cached loop per scorer, the records and FID (see :mod:`.score`)."""

from f2d_bench.scoring.score import ScoreSession, ScoreSummary, score_run

__all__ = ["ScoreSession", "ScoreSummary", "score_run"]
