"""Label Studio labeling configurations shipped with the tool (XML files beside this module)."""

from importlib.resources import files

ATTENTION = "attention.xml"  # SLIM's question: is the highlighted region the object (core) or not (spurious)?
COUNTERFACTUAL = "counterfactual.xml"  # the check of a generated image: does it still show its class (yes / no)?
ATTENTION_INSTRUCTIONS = "attention_instructions.html"  # shown to annotators before they start (project setting)
THRESHOLD_MARK = "CAM ≥ threshold"  # the attention config's header, where the run's threshold value goes


def load(name: str = ATTENTION) -> str:
    """The XML text of a shipped labeling config."""
    return (files(__name__) / name).read_text(encoding="utf-8")


def attention(threshold: float) -> str:
    """The attention config with the run's CAM threshold in its header (the right panel keeps attention above it)."""
    config = load(ATTENTION)
    if THRESHOLD_MARK not in config:
        raise ValueError(f"{ATTENTION} lost its '{THRESHOLD_MARK}' header")
    return config.replace(THRESHOLD_MARK, f"CAM ≥ {threshold:g}")
