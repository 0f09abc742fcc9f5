"""Which refinement stages do real work, decided by data flow from the `pseudo` params alone.

`pseudo.source` names where the pseudo masks come from; with `uncertain_to_void` the source is
compared with a second one (crf <-> rw, or crf for cam). A stage runs when a source needs it
(crf needs rw, rw needs AffinityNet, AffinityNet needs its labels); the others write their
declared outputs as marked placeholders, so the DAG keeps its shape and no stage learns a method.
"""
from __future__ import annotations

from wsss_core.config import PseudoParams

AFFINITY_BRANCH = ("affinity_labels", "train_affinity", "random_walk")
CRF_STAGE = "dcrf"
OPTIONAL_STAGES = (*AFFINITY_BRANCH, CRF_STAGE)


def compared_source(pseudo: PseudoParams) -> str | None:
    """Return the source that uncertain_to_void compares with (None when it is off)."""
    if not pseudo.uncertain_to_void:
        return None
    return "rw" if pseudo.source == "crf" else "crf"


def sources_used(pseudo: PseudoParams) -> set[str]:
    """Return every pseudo-mask source the pseudo_masks stage reads."""
    other = compared_source(pseudo)
    return {pseudo.source} | ({other} if other else set())


def skip_reason(stage: str, pseudo: PseudoParams) -> str | None:
    """Return why `stage` does no work with these pseudo params, or None when its output is needed."""
    used = sources_used(pseudo)
    needed = set()
    if used & {"rw", "crf"}:
        needed.update(AFFINITY_BRANCH)
    if "crf" in used:
        needed.add(CRF_STAGE)
    if stage in needed or stage not in OPTIONAL_STAGES:
        return None
    return f"pseudo.source is {pseudo.source!r}" + (" with uncertain_to_void" if pseudo.uncertain_to_void else "") \
        + f": nothing reads the output of {stage}"
