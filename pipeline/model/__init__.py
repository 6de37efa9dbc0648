"""Layer 2, the networks: classifiers, class activation maps, loaders, training, evaluation and the attention
stage with its typed arrays. Imports only :mod:`pipeline.core`."""
