"""Layer 4, Label Studio: the labeling vocabulary, the one SDK client, push, pull, the simulated annotator and a
local server. Imports the layers below it; the CLI, the demo and the ML backend sit on top."""
