"""Layer 1, the foundation: configuration, errors, atomic files, the run directory and its state (stages,
annotations), and the datasets. Imports nothing else of the pipeline; numpy, torch's Dataset and the standard
library only."""
