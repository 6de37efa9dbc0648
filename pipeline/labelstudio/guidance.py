"""The attention project's labeling instructions, with one worked example of each answer from the run itself.

Label Studio shows a project's instructions to each annotator before the first task. The shipped text
(``label_config/attention_instructions.html``) says what core, spurious and unsure mean; ``push`` adds two of the
run's own pictures -- one image the run has good reason to call core, one to call spurious -- drawn exactly as a
task draws them (image, GradCAM overlay, strongest attention), so the words meet this data set's look.

Which images, and why they are defensible (:func:`choose_examples`):

* Never an image that is or was a task (any round's selection): an example names its answer, and a task shown
  answered beforehand is an answer given to the annotator -- the anchoring that ``push --predictions hide``
  avoids. With several annotators per task, an answered task may still be open for someone else.
* Where people have answered (``propagation.npz`` with answered images, from ``pull`` or ``--labels``), the
  image the spread answers call most clearly core, and the one they call most clearly spurious, if the spread
  score is decided enough (P(core) at least 0.75, at most 0.25): a verdict people gave, carried to an image the
  model attends to the same way.
* Otherwise (the first push, before any answer) the attention prior's extremes (:mod:`pipeline.slim.prelabel`):
  the most compact attention as core, the most spread-out as spurious. That is a heuristic, not a judgement, so
  the caption says so; it is the clearest picture of each pattern the run has without a person's word. Where no
  image falls on one side of the prior's cut (coarse maps can be compact everywhere), the one closest to it is
  shown, and its caption says it only comes closest. The dataset's masks are never used: a real data set has
  none, and the examples must be what the tool itself can stand behind.
* Never an image whose map is blank (no attention at all): it shows nothing to judge, though its prior is 1.
* Among equally clear images, a correctly predicted one is preferred (the lesson "judge where it looked, not
  what it said" is then not muddled by a wrong prediction), then the more confident prediction.

The pictures are files below the run (``overlays/examples/``) that ``push`` stages like task pictures: uploaded
into the companion project, or served as local files. A data: URI would need no server at all, but Label Studio
sanitises instructions with bleach, which drops ``src`` attributes that are not http(s) or relative. A file's
name carries a digest of what it shows, so a re-push uploads nothing twice and the instructions change only when
the examples do.
"""

from __future__ import annotations

import html
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import label_config
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import fingerprint
from pipeline.core.data import load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import Run
from pipeline.labelstudio.client import Studio
from pipeline.slim.overlays import VIEWS, write_overlays
from pipeline.slim.prelabel import attention_prior
from pipeline.slim.propagate import Propagation

log = logging.getLogger(__name__)
EXAMPLE_WIDTH = 480  # px: the three-panel picture is scaled down to this width (a thumbnail of tens of kB)
PALETTE = 256  # colours of the thumbnail: indistinguishable from full colour at this size, half the file
MIN_CERTAINTY = 0.5  # a spread answer is an example only this far from undecided: P(core) >= 0.75 or <= 0.25
MARK = "slim-instructions"  # the class of the instructions' outer div: instructions this tool wrote
FORMER_START = "<h3>What you are judging</h3>"  # how the shipped text began before it carried MARK
FROM_ANSWERS, FROM_ATTENTION = "answers", "attention"


@dataclass(frozen=True)
class Example:
    """One worked example: an image, the answer it illustrates, how sure the run is, and on what grounds."""

    verdict: str  # core / spurious
    image_id: int
    p_core: float
    source: str  # FROM_ANSWERS (spread human answers) or FROM_ATTENTION (the attention prior)
    clear: bool = True  # False: no image is on this side of the cut; this one only comes closest


def asked_images(run: Run) -> set[int]:
    """Image ids of every round's selection: tasks, answered or not."""
    return {int(row["image_id"]) for round_ in run.rounds()
            for row in run.load_csv(run.selection_path(round_), "sample --run RUN")}


def pick(p_core: np.ndarray, eligible: np.ndarray, arrays: AttentionArrays, core: bool) -> int | None:
    """The row most clearly core (highest ``p_core``) or spurious (lowest) among ``eligible``; among equals (the
    prior comes in steps of one map cell), a correctly predicted one, then the most confident. None when no row is
    eligible."""
    rows = np.flatnonzero(eligible)
    if not len(rows):
        return None
    side = p_core[rows] if core else -p_core[rows]
    right = arrays.pred[rows] == arrays.y[rows]
    return int(rows[np.lexsort((-arrays.confidence[rows], ~right, -side))[0]])  # the last key sorts first


def choose_examples(run: Run, arrays: AttentionArrays) -> list[Example]:
    """The core example and the spurious example (see the module's docstring for the rules); none only where
    every image is a task or has a blank map."""
    eligible = ~np.isin(arrays.index, list(asked_images(run)))
    eligible &= np.asarray(arrays.cam).reshape(len(arrays), -1).max(axis=1) > 0
    sources = []
    if run.propagation_path.exists():
        propagation = Propagation.load(run.propagation_path)
        if propagation.matches(arrays) and propagation.answered.any():
            sources.append((FROM_ANSWERS, np.asarray(propagation.score, dtype=np.float64), MIN_CERTAINTY))
    sources.append((FROM_ATTENTION, attention_prior(arrays.cam).astype(np.float64), 0.0))
    examples = []
    for verdict, core in (("core", True), ("spurious", False)):
        for source, p_core, certainty in sources:
            decided = np.abs(p_core - 0.5) * 2 >= certainty
            side = (p_core >= 0.5) if core else (p_core < 0.5)
            row = pick(p_core, eligible & side & decided, arrays, core)
            if row is not None:
                examples.append(Example(verdict, int(arrays.index[row]), round(float(p_core[row]), 2), source))
                break
        else:  # nothing on this side: the prior's extreme, which only leans that way
            source, p_core, _ = sources[-1]
            row = pick(p_core, eligible, arrays, core)
            if row is not None:
                examples.append(Example(verdict, int(arrays.index[row]), round(float(p_core[row]), 2), source,
                                        clear=False))
        if row is not None:
            eligible[row] = False  # two different images, even where every map looks alike
    return examples


def example_path(run: Run, example: Example, threshold: float) -> Path:
    """Where an example's picture lives: the name says what it shows (a re-push stages nothing twice, and a new
    example is a new file, never a changed one behind an old URL)."""
    key = fingerprint(run.stage_fingerprint("embed"), example.image_id, threshold, EXAMPLE_WIDTH, PALETTE)[:10]
    return run.root / "overlays" / "examples" / f"example-{example.verdict}-{example.image_id:06d}-{key}.png"


def draw_example(image_path: Path, cam: np.ndarray, threshold: float, target: Path) -> None:
    """The task's three panels (image | GradCAM | strongest attention, :mod:`pipeline.slim.overlays`), scaled
    down to :data:`EXAMPLE_WIDTH`."""
    with tempfile.TemporaryDirectory() as folder:
        views = {kind: Path(folder) / f"{kind}.png" for kind in VIEWS}
        write_overlays(image_path, cam, threshold, views)
        with Image.open(views["overview"]) as overview:
            picture = overview.convert("RGB")
    picture.thumbnail((EXAMPLE_WIDTH, EXAMPLE_WIDTH), Image.Resampling.LANCZOS)
    picture = picture.quantize(PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)  # half the bytes
    atomic_write(target, lambda handle: picture.save(handle, format="PNG", optimize=True))


def example_pictures(run: Run, arrays: AttentionArrays) -> list[tuple[Example, Path]]:
    """The examples with their pictures, drawn where missing (the dataset is read only then); pictures of
    earlier examples are removed. Empty, with a warning, when they cannot be made (the images moved, say): the
    instructions then go without examples, and the push goes on."""
    try:
        threshold = run.load_config().embed.threshold
        examples = [(example, example_path(run, example, threshold)) for example in choose_examples(run, arrays)]
        missing = [(example, path) for example, path in examples if not path.exists()]
        if missing:
            config = run.load_config()
            image_set = load_dataset(config.data.root, run.manifest_path)
            for example, path in missing:
                sample = image_set.samples[example.image_id]
                draw_example(image_set.root / sample.filename, arrays.cam[arrays.row_of(example.image_id)],
                             threshold, path)
    except (PipelineError, OSError, IndexError) as exc:
        log.warning("the labeling instructions go without examples: %s", exc)
        return []
    if examples:
        for stale in examples[0][1].parent.glob("example-*.png"):
            if stale not in {path for _, path in examples}:
                stale.unlink(missing_ok=True)
    return examples


def caption(example: Example, arrays: AttentionArrays) -> str:
    """What the annotator reads above an example: the answer, on what grounds, and the task's line."""
    row = arrays.row_of(example.image_id)
    names = list(arrays.class_names) or [str(c) for c in range(int(arrays.y.max()) + 1)]
    task_line = (f"class: {names[int(arrays.y[row])]} · model predicts: {names[int(arrays.pred[row])]} "
                 f"({float(arrays.confidence[row]):.0%})")
    if example.source == FROM_ANSWERS:
        grounds = (f"the answers given so far, spread to the images the model attends to in the same way, call "
                   f"it {example.verdict} (P(core) {example.p_core:.2f}); nobody was asked about it directly.")
    else:
        shape, pattern = (("compact", "compact, as on an object") if example.verdict == "core"
                          else ("spread out", "spread over much of the image"))
        if example.clear:
            guess = (f"the tool's guess from the shape of the attention alone ({pattern}; P(core) "
                     f"{example.p_core:.2f})")
        else:
            guess = (f"the tool's nearest guess: no image of this run has attention {shape} enough for its shape "
                     f"alone to say {example.verdict}, and this one's is the most {shape} (P(core) "
                     f"{example.p_core:.2f}, only a leaning)")
        grounds = (f"{guess}. Nobody has judged it, and the guess can be wrong: check it against the rules above "
                   "as you would a task.")
    return f"<b>{example.verdict}</b>: {html.escape(grounds, quote=False)} <i>{html.escape(task_line)}</i>"


def instructions(pictures: list[tuple[Example, Path]] = (), urls: dict[str, str] | None = None,
                 arrays: AttentionArrays | None = None) -> str:
    """The instructions' HTML: the shipped text, then the examples (``urls``: file name -> the URL the
    annotator's browser loads it from), in the form Label Studio's sanitiser keeps unchanged (so that comparing
    with what the project holds tells whether an update is needed)."""
    parts = [f'<div class="{MARK}">', label_config.load(label_config.ATTENTION_INSTRUCTIONS).strip()]
    if pictures:
        parts.append("<h3>Examples from this run</h3>")
        parts.append("<p>Each picture is drawn as your tasks are: the image, where the model looked, and the "
                     "strongest part of it. These images are not among your tasks.</p>")
        for example, path in pictures:
            alt = f"{example.verdict} example: image {example.image_id}"
            parts.append(f"<p>{caption(example, arrays)}</p>")
            parts.append(f'<p><img src="{html.escape(urls[path.name])}" alt="{alt}"></p>')
    parts.append("</div>")
    return "\n".join(parts)


def show_instructions(studio: Studio, project_id: int, pictures: list[tuple[Example, Path]], urls: dict[str, str],
                      arrays: AttentionArrays) -> bool:
    """Give the project the instructions with these examples, unless it shows them already or has instructions
    of someone else's (kept, with a warning); True when they were written."""
    if not written_by_this_tool(studio.project(project_id).expert_instruction or ""):
        log.warning("project %d has instructions of its own: kept as they are, without the run's examples", project_id)
        return False
    written = studio.set_instructions(project_id, instructions(pictures, urls, arrays))
    if written:
        log.info("project %d: labeling instructions updated, with examples %s", project_id, ", ".join(
            f"{example.verdict} image {example.image_id} (from the {example.source})" for example, _ in pictures)
            or "none")
    return written


def written_by_this_tool(current: str) -> bool:
    """Whether a project's instructions may be replaced: none yet, or text this tool wrote (its mark, or the
    shipped text from before the mark). Someone's own instructions are kept."""
    text = current.strip()
    return not text or f'class="{MARK}"' in text or text.startswith(FORMER_START)
