"""Evaluation metrics: FID (:mod:`.fid`, :mod:`.inception`), statistics (:mod:`.stats`), result files
(:mod:`.results`) and sample-directory reading (:mod:`.imagedir`). Per-image preference scorers live in
:mod:`epd.rewards`, which registers every metric (FID included) in one registry."""
