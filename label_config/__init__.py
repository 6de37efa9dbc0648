"""Label Studio labeling configurations shipped with the tool (XML files beside this module)."""

from importlib.resources import files

ATTENTION = "attention.xml"  # SLIM's question: is the highlighted region the object (core) or not (spurious)?
COUNTERFACTUAL = "counterfactual.xml"  # the check of a generated image: does it still show its class (yes / no)?


def load(name: str = ATTENTION) -> str:
    """The XML text of a shipped labeling config."""
    return (files(__name__) / name).read_text(encoding="utf-8")
