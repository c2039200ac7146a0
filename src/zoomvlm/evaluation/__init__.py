"""Evaluation: resumable, shardable runs (:mod:`~zoomvlm.evaluation.run`) and reports (table, accuracy-vs-RTR
plot, gallery: :mod:`~zoomvlm.evaluation.report`)."""
