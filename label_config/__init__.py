"""Label Studio labeling configurations shipped with the tool (XML files beside this module)."""

from importlib.resources import files


def load(name: str = "attention.xml") -> str:
    """The XML text of a shipped labeling config."""
    return (files(__name__) / name).read_text(encoding="utf-8")
