"""The labeling config's vocabulary: control names, and how answers and guesses are written in Label Studio's shape.

``label_config/attention.xml`` names its controls; predictions must use those names and annotations are read
back through them. A project may use another config (a customised copy), so the names can also be read from the
config's XML (:func:`control_names`). Nothing here talks to a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from pipeline.core.store import Annotation
from pipeline.core.verdicts import CHOICES, verdict

# control names in label_config/attention.xml
ANSWER, ATTENTION_VIEW, IMAGE_VIEW, BOXES, NOTE = "answer", "attention", "image", "object", "note"
SCORE_DECIMALS = 4  # a prediction's score is shown to annotators; more digits are noise


@dataclass(frozen=True)
class ControlNames:
    """Where an answer goes in a project's labeling config."""

    from_name: str = ANSWER
    to_name: str = ATTENTION_VIEW


class ConfigError(ValueError):
    """A labeling config that has no place for a core/spurious answer."""


def control_names(schema: str | None) -> ControlNames:
    """The Choices control offering core/spurious, and the object it labels, read from the config XML."""
    if not schema:
        return ControlNames()
    try:  # the config arrives over HTTP (the backend's /setup and /predict): no entities, no external DTDs
        root = fromstring(schema)
    except DefusedXmlException as exc:
        raise ConfigError(f"label config uses forbidden XML features ({exc.__class__.__name__})") from None
    except ParseError as exc:
        raise ConfigError(f"label config is not valid XML: {exc}") from None
    for choices in root.iter("Choices"):
        values = {c.get("value") for c in choices.iter("Choice")}
        if {"core", "spurious"} <= values and choices.get("name") and choices.get("toName"):
            return ControlNames(choices.get("name"), choices.get("toName").split(",")[0])
    raise ConfigError("label config has no Choices control with the values core and spurious")


def choice_result(choice: str, names: ControlNames = ControlNames()) -> list[dict]:
    """The ``result`` list of a core/spurious/unsure answer, as the labeling UI submits it."""
    return [{"from_name": names.from_name, "to_name": names.to_name, "type": "choices",
             "value": {"choices": [choice]}}]


def prediction(p_core: float, model_version: str, names: ControlNames = ControlNames()) -> dict:
    """A Label Studio prediction: the likelier verdict, scored by how sure the guess is."""
    return {"model_version": model_version, "score": round(float(max(p_core, 1.0 - p_core)), SCORE_DECIMALS),
            "result": choice_result(verdict(p_core), names)}


def parse_annotation(raw: dict, task_id: int, image_id: int, users: dict[int, str]) -> Annotation:
    """A Label Studio annotation (task listing or webhook shape) as a stored :class:`Annotation`."""
    choice, boxes, note = None, [], None
    for item in raw.get("result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == ANSWER and value.get("choices"):
            picked = value["choices"][0]
            choice = picked if picked in CHOICES else None
        elif item.get("from_name") == BOXES and item.get("type") == "rectanglelabels":
            boxes.append({k: value[k] for k in ("x", "y", "width", "height", "rotation") if k in value})
        elif item.get("from_name") == NOTE and value.get("text"):
            note = "\n".join(value["text"])
    author = raw.get("completed_by")
    if isinstance(author, dict):
        annotator = author.get("email") or str(author.get("id"))
    else:
        annotator = users.get(author, str(author)) if author is not None else None
    return Annotation(
        annotation_id=int(raw["id"]), task_id=task_id, image_id=image_id, annotator=annotator, choice=choice,
        skipped=bool(raw.get("was_cancelled")), boxes=boxes, note=note, created_at=raw.get("created_at"),
        updated_at=raw.get("updated_at"), lead_time=raw.get("lead_time"),
    )
