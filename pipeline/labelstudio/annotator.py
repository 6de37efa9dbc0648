"""``simulate-annotator``: answer open tasks through Label Studio as careful people with masks would.

It sees what an annotator sees — the task (its image id) and the attention map drawn on its overlay — plus
the one thing a person would judge by eye: the object's true mask. Its rule: AIoU >= 0.5 (at least half of
the strongest attention lies on the object) means ``core``, else ``spurious``; ``--noise`` flips that
fraction of answers. With ``--checks`` it answers the counterfactual checks of ``push-checks`` instead: ``yes``
while at least half of the donor's object (its mask) is still in the generated image, else ``no``. Answers are
submitted through the same API endpoint the labeling UI posts to, so ``pull`` and the ML backend cannot tell
them from a person's.

By default one annotator (the API key's user) answers each open task once. ``--annotators K`` makes it a team:
K distinct Label Studio users (``sim-annotator-1@slim.local``, ...; ``--team`` names another set), each acting
through a token of its own, wrong at its own ``--noise`` rate and working at its own pace. The team gives each
task what the project still asks for — a task wanting N answers (``push --annotations-per-task N``; Label Studio's per-task overlap)
gets them from up to N distinct members, never two from one — dealt by ``--seed`` so that members get equal
shares. As the instructions ask, every answer also draws the object's bounding box (the true mask's, each side
moved by ``--box-jitter``) with the config's rectangle tool; ``--box-share`` draws it on only that fraction (0: an
annotator who skips the box). The counterfactual checks have no box.

The team's logins are secrets: ``RUN/label-studio/team.json`` (mode 0600) keeps each member's user id, password
and token per server, and no log line shows them. A re-run reuses them; a member that exists on the server
without them (the file was lost) is logged into with the password derived from the admin's API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import option
from pipeline.core.data import ImageSet, load_dataset, load_mask, load_rgb, resolve_image_size
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.core.verdicts import AIOU_CORE
from pipeline.labelstudio.client import Settings, Studio, UserLogin
from pipeline.labelstudio.pull import nothing_pushed
from pipeline.labelstudio.schema import BOXES, IMAGE_VIEW, choice_result
from pipeline.labelstudio.verify import CHECK_NAMES, META_KEY, NO, YES
from pipeline.slim.counterfactual import manifest
from pipeline.slim.overlays import full_cam

log = logging.getLogger(__name__)
OBJECT_KEPT = 0.5  # at least half of the object still there: a person would still recognise the class
SAME_PIXEL = 1 / 255  # a pixel kept from the donor differs from it by PNG rounding at most
LEAD_TIME_S = (2.0, 8.0)  # seconds a simulated answer takes, uniform: what a quick annotator spends per task
# A team member's seconds per task: lognormal around the member's own median (a glance at an obvious map, a
# long look at an ambiguous one), the medians lognormal around the team's (people differ in pace about twofold)
TEAM_MEDIAN_LEAD_TIME_S = 6.0
PACE_SPREAD = 0.4  # sigma of log(member median): the middle 95 % of members between 0.46x and 2.2x the team's
TASK_SPREAD = 0.5  # sigma of log(lead time) around a member's median
LEAD_TIME_LIMITS_S = (1.0, 120.0)  # nobody answers faster than a click; an idle tab is not work time
TEAM = "sim-annotator"  # the default team's name: its members are sim-annotator-1@slim.local, ...
TEAM_DOMAIN = "slim.local"
TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,40}$")  # the local part of an e-mail address, kept plain
TEAM_FILE = "team.json"  # in the run's label-studio folder: the members' logins, per server
PASSWORD_BYTES = 24  # 32 characters of base64: far past Label Studio's minimum length, unguessable
BOX_LABEL = "core object"  # the rectangle's label in label_config/attention.xml
# the random streams of one task (numpy seeds that differ only by trailing zeros are the same stream, so
# every tag is nonzero): a member's answer is [seed, task, member]; the others end in their tag
BOX_STREAM, DEAL_STREAM, PACE_STREAM = 1, 2, 3


@dataclass(frozen=True)
class AnnotatorOptions:
    """How the simulated annotators answer; the fields are :func:`simulate_annotator`'s keyword arguments."""

    annotators: int = option(1, "simulated annotators; above 1 each is a Label Studio user of its own (created "
                                "on first use) answering with its own token, and a task is answered by as many "
                                "distinct ones as the project asks for (push --annotations-per-task); 1 answers "
                                "each open task once as the API key's user", metavar="K")
    noise: tuple[float, ...] = option((0.0,), "fraction of answers flipped: one value for every annotator, or "
                                              "one per annotator", metavar="F")
    team: str = option(TEAM, "with --annotators above 1: the team's name; its members are NAME-1@"
                             f"{TEAM_DOMAIN}, NAME-2@..., and another name makes other users", metavar="NAME")
    seed: int = option(0, "seed of the noise, lead times, boxes and who answers what")
    box_share: float = option(1.0, "fraction of answers that also draw the object's bounding box (from its true "
                                   "mask) with the config's rectangle tool, as the instructions ask (attention "
                                   "tasks only: the checks have no box)", metavar="F")
    box_jitter: float = option(0.0, "how far a drawn box's sides stray: the standard deviation of each side's "
                                    "shift as a fraction of the box's width or height (0.1: a tenth)", metavar="F")
    checks: bool = option(False, "answer the counterfactual check tasks of push-checks instead: yes while at "
                                 "least half of the donor's object (its true mask) is still in the image")


@dataclass(frozen=True)
class Answerer:
    """How one kind of task is answered: the answer from the task's data, the entropy of its noise and lead
    time (fixed per task, so a re-run gives the same answer), the two answers a flip swaps, an answer as the
    ``result`` the labeling UI would submit, and the object's mask with the picture's side in pixels (``None``
    where the task has no box tool; the callable answers ``None`` for an image without an object)."""

    decide: Callable[[dict], str]
    entropy: Callable[[dict], int]
    answers: tuple[str, str]
    result: Callable[[str], list[dict]]
    object_mask: Callable[[dict], tuple[np.ndarray, int] | None] | None = None


@dataclass(frozen=True)
class Member:
    """One simulated annotator of a team: who it is in Label Studio, how often it errs and how fast it works."""

    number: int  # 1-based: sim-annotator-<number>
    login: UserLogin
    noise: float
    median_lead_time: float


def decide(low_res_cam: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[str, float]:
    """(choice, AIoU) for one image from the map the annotator sees and the object's mask."""
    import torch  # the attention pass's own AIoU; imported here so Label Studio commands start without torch

    from pipeline.model.attention import aiou

    cam = torch.from_numpy(full_cam(low_res_cam, mask.shape[0]))[None]
    value = float(aiou(cam, torch.from_numpy(mask)[None].float(), threshold)[0])
    return ("core" if value >= AIOU_CORE else "spurious"), value


def object_kept(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> float:
    """Share of the object's pixels (``mask``) that the generated image kept from its donor."""
    same = np.abs(generated - original).max(axis=2) <= SAME_PIXEL
    return float((same & mask).sum() / max(int(mask.sum()), 1))


# --- boxes ------------------------------------------------------------------------------------------------
def mask_box(mask: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | None = None) -> dict:
    """The bounding box of a (non-empty) mask as a Label Studio rectangle (percent of the image), each side
    moved by a normal draw of ``jitter`` times the box's width (left, right) or height (top, bottom): a person
    drawing quickly misses the object's edge by a share of its size, whatever the image's resolution. The box
    stays inside the image and at least one pixel wide and high."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    side = 100.0 / mask.shape[0]
    left, top, right, bottom = cols[0] * side, rows[0] * side, (cols[-1] + 1) * side, (rows[-1] + 1) * side
    if jitter > 0:
        rng = rng if rng is not None else np.random.default_rng()
        width, height = right - left, bottom - top
        left, right = (float(np.clip(v + rng.normal(0.0, jitter * width), 0.0, 100.0)) for v in (left, right))
        top, bottom = (float(np.clip(v + rng.normal(0.0, jitter * height), 0.0, 100.0)) for v in (top, bottom))
        left, right = sorted((left, right))
        top, bottom = sorted((top, bottom))
        right, bottom = max(right, min(left + side, 100.0)), max(bottom, min(top + side, 100.0))
        left, top = min(left, right - side), min(top, bottom - side)
    return {"x": float(left), "y": float(top), "width": float(right - left), "height": float(bottom - top)}


def box_result(box: dict, size: int) -> dict:
    """A rectangle around the object as the labeling UI submits it (``object`` on ``image``; ``size``: the
    picture's side in pixels)."""
    return {"from_name": BOXES, "to_name": IMAGE_VIEW, "type": "rectanglelabels", "original_width": size,
            "original_height": size, "image_rotation": 0,
            "value": {**box, "rotation": 0, "rectanglelabels": [BOX_LABEL]}}


# --- one answer -------------------------------------------------------------------------------------------
def respond(answerer: Answerer, data: dict, rng: np.random.Generator, noise: float) -> tuple[str, bool]:
    """(answer, flipped): the rule's answer for the task, swapped for the other one with probability ``noise``
    (the first draw of ``rng``)."""
    first, second = answerer.answers
    answer = answerer.decide(data)
    if rng.random() < noise:
        return (second if answer == first else first), True
    return answer, False


def drawn_box(answerer: Answerer, data: dict, stream: Sequence[int], share: float, jitter: float) -> list[dict]:
    """The box result items of one answer: the object's box on ``share`` of the answers (drawn from its own
    random ``stream``, so asking for boxes never changes the answers or lead times), else none."""
    if share <= 0 or answerer.object_mask is None:
        return []
    rng = np.random.default_rng([*stream, BOX_STREAM])
    if rng.random() >= share:
        return []
    found = answerer.object_mask(data)
    if found is None:
        return []
    mask, size = found
    return [box_result(mask_box(mask, jitter, rng), size)]


def answer_open_tasks(settings: Settings, project: int, run_id: str | None, answerer: Answerer, noise: float,
                      seed: int, progress: bool, box_share: float = 0.0, box_jitter: float = 0.0) -> dict[str, int]:
    """Answer each task of this run in ``project`` that nobody answered or skipped yet, as the API key's user;
    counts by answer."""
    first, second = answerer.answers
    counts = {first: 0, second: 0, "flipped": 0, "boxes": 0}
    with Studio(settings) as studio:
        open_tasks = [t for t in studio.list_tasks(project)
                      if (t.get("data") or {}).get("run_id") == run_id
                      and t["total_annotations"] == 0 and t["cancelled_annotations"] == 0]
        for task in tqdm(open_tasks, desc="annotate", unit="task", disable=not progress):
            entropy = answerer.entropy(task["data"])
            rng = np.random.default_rng([seed, entropy])
            answer, flipped = respond(answerer, task["data"], rng, noise)
            boxes = drawn_box(answerer, task["data"], (seed, entropy, 0), box_share, box_jitter)
            # submitted once (a broken connection is reported): a re-run answers only the tasks still open
            studio.submit_annotation(int(task["id"]), project, answerer.result(answer) + boxes,
                                     lead_time=round(float(rng.uniform(*LEAD_TIME_S)), 2))
            counts[answer] += 1
            counts["flipped"] += flipped
            counts["boxes"] += len(boxes)
    log.info(f"answered {len(open_tasks)} open tasks ({first} {counts[first]}, {second} {counts[second]}; "
             f"{counts['flipped']} flipped by --noise {noise:g}" + (f"; {counts['boxes']} with a box"
                                                                  if box_share > 0 else "") + ")")
    return counts


# --- a team -----------------------------------------------------------------------------------------------
def team_path(run: Run) -> Path:
    """Where the run keeps its team's logins (beside the local Label Studio's data, if any)."""
    return run.labelstudio_dir / TEAM_FILE


def derived_password(admin_key: str, email: str) -> str:
    """A new member's password: an HMAC of its email under the admin's API key. Nobody without that key can
    guess it, and the same admin can log the member in again after the team file is lost (the server's URL is
    left out: a local server's port changes from one start to the next)."""
    digest = hmac.new(admin_key.encode(), email.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:PASSWORD_BYTES]).decode()


def load_team(path: Path) -> dict[str, dict[str, dict]]:
    """server URL -> member email -> {user_id, password, token}; empty when there is no file yet."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["servers"]
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"{path} is damaged; delete it (the team's users are kept in Label Studio and logged "
                            "into again)") from None


def save_team(path: Path, servers: dict[str, dict[str, dict]]) -> None:
    """Write the team file atomically, readable by its owner only (mode 0600, set before any byte is written);
    a folder made for it is private too."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)

    def write(handle) -> None:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(json.dumps({"servers": servers}, indent=1, sort_keys=True).encode())

    atomic_write(path, write)


def member_email(team: str, number: int) -> str:
    """The e-mail address (and so the Label Studio user) of member ``number`` of ``team``."""
    return f"{team}-{number}@{TEAM_DOMAIN}"


def member_login(studio: Studio, email: str, saved: dict, known: Sequence[str], existing: dict[str, int],
                 personal: bool, path: Path) -> UserLogin:
    """The member ``email`` signed in: its ``saved`` token when the server still takes it, else a login with the
    first password that works (``known`` ones -- the team file's for this email, under any URL the server had --
    then the derived one) when the user exists, or a signup through the organisation's invite link when not."""
    if saved.get("token"):
        member = Studio(Settings(studio.settings.url, saved["token"], studio.settings.retry))
        try:
            member.connect()
            if int(member.user.id) == saved.get("user_id"):
                return UserLogin(int(member.user.id), email, saved["token"], saved.get("password") or "")
        except PipelineError:  # revoked, expired, or another server's: sign in afresh
            pass
        finally:
            member.close()
    derived = derived_password(studio.settings.api_key, email)
    if email in existing:
        login = studio.log_in_user(email, list(dict.fromkeys([*known, derived])), personal)
    else:
        login = studio.sign_up_user(email, derived, studio.invite_token(), personal)
    if login is None:
        raise PipelineError(f"Label Studio at {studio.settings.url} has a user {email}, but not with a password this "
                            f"tool knows ({path} is gone, or was made with another API key); restore that file, or "
                            "pass --team with another name to sign up a new team")
    return login


def assemble_team(studio: Studio, team_name: str, size: int, path: Path) -> list[UserLogin]:
    """The logins of ``team_name``'s first ``size`` members on ``studio``'s server, creating the users that do not
    exist yet; each is saved as soon as it is known, so a run stopped half-way never creates a member twice."""
    servers = load_team(path)
    team = servers.setdefault(studio.settings.url, {})
    existing = {email.lower(): user_id for user_id, email in studio.users().items()}
    personal = not studio.legacy_tokens_enabled()
    logins, created = [], 0
    for number in range(1, size + 1):
        email = member_email(team_name, number)
        saved = team.get(email, {})
        known = [p for p in (saved.get("password"), *(entries.get(email, {}).get("password")
                                                       for entries in servers.values())) if p]
        login = member_login(studio, email, saved, known, existing, personal, path)
        created += email not in existing
        record = {"user_id": login.user_id, "password": login.password, "token": login.token}
        if record != saved:
            team[email] = record
            save_team(path, servers)
        logins.append(login)
    log.info("team of %d: %s (%d new in Label Studio); logins kept in %s", size,
             ", ".join(login.email for login in logins), created, path)
    return logins


def member_pace(seed: int, number: int) -> float:
    """Member ``number``'s median seconds per task (lognormal around the team's median, fixed by ``seed``)."""
    rng = np.random.default_rng([seed, number, 0, PACE_STREAM])
    return float(TEAM_MEDIAN_LEAD_TIME_S * np.exp(PACE_SPREAD * rng.standard_normal()))


def deal(tasks: Sequence[dict], members: Sequence[int], seed: int, entropy: Callable[[dict], int]) -> dict[int, list[int]]:
    """Task id -> the user ids (among ``members``) that answer it now.

    A task wants as many answers as its ``overlap`` (Label Studio's per-task count, from the project's maximum
    annotations and overlap cohort); answers and skips it already has count, and whoever gave them
    (``annotators``) is not asked again. Tasks are dealt in id order to the members with the fewest answers on
    these tasks so far, ties broken by a shuffle seeded by ``seed`` and the task: on a fresh project the shares
    differ by one at most, and the same open tasks are always dealt alike.
    """
    load = Counter(user for task in tasks for user in task.get("annotators") or [] if user in members)
    dealt: dict[int, list[int]] = {}
    for task in sorted(tasks, key=lambda t: int(t["id"])):
        wanted = int(task.get("overlap") or 1) - task["total_annotations"] - task["cancelled_annotations"]
        answered = set(task.get("annotators") or [])
        eligible = [user for user in members if user not in answered]
        if wanted <= 0 or not eligible:
            continue
        shuffle = np.random.default_rng([seed, entropy(task["data"]), 0, DEAL_STREAM]).permutation(len(eligible))
        chosen = sorted(eligible, key=lambda user: (load[user], shuffle[eligible.index(user)]))[:wanted]
        load.update(chosen)
        dealt[int(task["id"])] = chosen
    return dealt


def answer_as_team(settings: Settings, project: int, run_id: str | None, answerer: Answerer, members: list[Member],
                   seed: int, progress: bool, box_share: float = 0.0, box_jitter: float = 0.0) -> dict[str, int]:
    """Each task of this run that still wants answers gets them from distinct members (:func:`deal`), each
    submitted with that member's own token, noise and pace; counts by answer."""
    first, second = answerer.answers
    counts = {first: 0, second: 0, "flipped": 0, "boxes": 0}
    by_user = {member.login.user_id: member for member in members}
    with Studio(settings) as studio:
        tasks = [t for t in studio.list_tasks(project, fields=("id", "data", "overlap", "annotators",
                                                               "total_annotations", "cancelled_annotations"))
                 if (t.get("data") or {}).get("run_id") == run_id]
    dealt = deal(tasks, list(by_user), seed, answerer.entropy)
    short = sum(int(t.get("overlap") or 1) - t["total_annotations"] - t["cancelled_annotations"]
                > len(dealt.get(int(t["id"]), [])) for t in tasks)
    if short:
        log.warning("%d task(s) want more answers than the %d annotators who have not answered them can give; "
                    "pass a larger --annotators", short, len(members))
    data = {int(t["id"]): t["data"] for t in tasks}
    per_member: Counter[str] = Counter()
    jobs = [(task_id, user) for task_id, users in dealt.items() for user in users]
    studios = {user: Studio(Settings(settings.url, member.login.token, settings.retry))
               for user, member in by_user.items()}
    try:
        for task_id, user in tqdm(jobs, desc="annotate", unit="answer", disable=not progress):
            member, task_data = by_user[user], data[task_id]
            entropy = answerer.entropy(task_data)
            rng = np.random.default_rng([seed, entropy, member.number])
            answer, flipped = respond(answerer, task_data, rng, member.noise)
            lead_time = float(np.clip(member.median_lead_time * np.exp(TASK_SPREAD * rng.standard_normal()),
                                      *LEAD_TIME_LIMITS_S))
            boxes = drawn_box(answerer, task_data, (seed, entropy, member.number), box_share, box_jitter)
            # submitted once (a broken connection is reported): a re-run deals only what is still wanted
            studios[user].submit_annotation(task_id, project, answerer.result(answer) + boxes,
                                            lead_time=round(lead_time, 2))
            counts[answer] += 1
            counts["flipped"] += flipped
            counts["boxes"] += len(boxes)
            per_member[member.login.email] += 1
    finally:
        for member_studio in studios.values():
            member_studio.close()
    if not jobs:
        log.info("no task of this run wants another answer from the %d annotators", len(members))
        return counts
    log.info(f"{len(jobs)} answers to {len(dealt)} tasks ({first} {counts[first]}, {second} {counts[second]}; "
             f"{counts['flipped']} flipped" + (f"; {counts['boxes']} with a box" if box_share > 0 else "") + "): "
             + ", ".join(f"{m.login.email} {per_member[m.login.email]} (noise {m.noise:g})" for m in members))
    return counts


# --- what is judged -----------------------------------------------------------------------------------------
def masked_dataset(run: Run) -> ImageSet:
    """The run's dataset, which must have masks: they are what the simulated annotator judges by."""
    image_set = load_dataset(run.load_config().data.root, run.manifest_path)
    if not image_set.has_masks:
        raise PipelineError(f"{image_set.root} has no mask_filename column; the simulated annotator needs masks")
    return image_set


def attention_answerer(run: Run, image_set: ImageSet) -> Answerer:
    """core / spurious from the AIoU of the map the annotator sees on the object's mask, which boxes come from."""
    config = run.load_config()
    size = resolve_image_size(image_set, config.data.image_size)
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))

    @lru_cache(maxsize=1)  # a team answers a task several times in a row: its mask is read once
    def mask_of(image_id: int) -> np.ndarray:
        return load_mask(image_set.root / image_set.samples[image_id].mask_filename, size)

    def decide_task(data: dict) -> str:
        image_id = int(data["image_id"])
        return decide(arrays.cam[arrays.row_of(image_id)], mask_of(image_id), config.embed.threshold)[0]

    def object_mask(data: dict) -> tuple[np.ndarray, int] | None:
        mask = mask_of(int(data["image_id"]))
        return (mask, size) if mask.any() else None

    return Answerer(decide_task, lambda data: int(data["image_id"]), ("core", "spurious"), choice_result,
                    object_mask)


def check_answerer(run: Run, image_set: ImageSet) -> Answerer:
    """yes / no from how much of the donor's object the generated image kept (:data:`OBJECT_KEPT`)."""
    rows = {r["key"]: r for r in manifest(run)}
    size = json.loads((run.counterfactual_dir / "dataset.json").read_text())["image_size"]

    def decide_task(data: dict) -> str:
        row = rows.get(data["key"])
        if row is None:  # no longer generated: its answer changes nothing, but a person would still give one
            return YES
        donor = image_set.samples[int(row["donor"])]
        kept = object_kept(load_rgb(run.counterfactual_dir / row["img_filename"], size),
                           load_rgb(image_set.root / donor.filename, size),
                           load_mask(image_set.root / donor.mask_filename, size))
        return YES if kept >= OBJECT_KEPT else NO

    return Answerer(decide_task, lambda data: int(data["key"], 16), (YES, NO),
                    lambda answer: choice_result(answer, CHECK_NAMES))


def noise_per_annotator(noise: float | Sequence[float], annotators: int) -> list[float]:
    """One noise rate per annotator from ``--noise`` (one value for all, or one each), checked."""
    rates = [float(noise)] if isinstance(noise, (int, float)) else [float(n) for n in noise]
    if annotators < 1:
        raise PipelineError(f"--annotators must be at least 1, got {annotators}")
    if len(rates) not in (1, annotators):
        raise PipelineError(f"--noise has {len(rates)} values for {annotators} annotators; give one value for all "
                            f"of them or one per annotator")
    bad = [n for n in rates if not 0.0 <= n <= 1.0]
    if bad:
        raise PipelineError(f"--noise must be fractions in [0, 1], got {bad[0]:g}")
    return rates * annotators if len(rates) == 1 else rates


def simulate_annotator(run: Run, settings: Settings, noise: float | Sequence[float] = 0.0, seed: int = 0,
                       checks: bool = False, annotators: int = 1, box_share: float = 1.0, box_jitter: float = 0.0,
                       team: str = TEAM, progress: bool = True) -> dict[str, int]:
    """Answer the open tasks of the run's project (with ``checks``: of its check project) as one annotator, or
    as a team of ``annotators`` Label Studio users; counts by answer (and ``flipped``, ``boxes``)."""
    rates = noise_per_annotator(noise, annotators)
    if not 0.0 <= box_share <= 1.0:
        raise PipelineError(f"--box-share must be a fraction in [0, 1], got {box_share:g}")
    if box_jitter < 0:
        raise PipelineError(f"--box-jitter must be at least 0, got {box_jitter:g}")
    if not TEAM_NAME.match(team):
        raise PipelineError(f"--team must be lower-case letters, digits, '.', '_' or '-' (at most 41), got {team!r}")
    image_set = masked_dataset(run)
    answerer = (check_answerer if checks else attention_answerer)(run, image_set)
    store = AnnotationStore(run.labels_path)
    try:
        project, run_id = store.get_meta(META_KEY if checks else "project_id"), store.get_meta("run_id")
    finally:
        store.close()
    if project is None:
        raise nothing_pushed(run, "push-checks" if checks else "push")
    if annotators == 1:
        return answer_open_tasks(settings, int(project), run_id, answerer, rates[0], seed, progress, box_share,
                                 box_jitter)
    with Studio(settings) as studio:
        logins = assemble_team(studio, team, annotators, team_path(run))
    members = [Member(number, login, rate, member_pace(seed, number))
               for number, (login, rate) in enumerate(zip(logins, rates, strict=True), start=1)]
    return answer_as_team(settings, int(project), run_id, answerer, members, seed, progress, box_share, box_jitter)
