"""Layer 3, the method (SLIM): choose images to annotate, spread the answers, curate, reweight, retrain, report.
Imports :mod:`pipeline.core` and :mod:`pipeline.model`; knows nothing of Label Studio."""
