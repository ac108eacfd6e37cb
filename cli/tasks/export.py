"""The task families as labelled items (calibration/items.py): the same prompts, answers, rules,
length caps and stop strings, tagged by family, with the families' own split, so that fitting on
the export is fitting on the families."""

from __future__ import annotations

from collections.abc import Sequence

from coolfusion.calibration.items import LabelledItem
from coolfusion.cli.tasks import FAMILIES, SPLITS, TaskItem, items


def labelled(item: TaskItem) -> LabelledItem:
    """One family item as a labelled item: tag = family, same id (unique across the families: their
    kinds differ), split, prompt, answers and rule, the family's cap and stop strings."""
    family = FAMILIES[item.family]
    if not isinstance(item.prompt, str):
        raise TypeError(f"{item.family}:{item.id}: the task families ask plain prompts")
    return LabelledItem(
        id=item.id,
        tag=item.family,
        split=item.split,
        prompt=item.prompt,
        answers=item.answers,
        rule=item.rule.answer_rule,
        max_new_tokens=family.max_new_tokens,
        stop=family.stop,
        split_given=True,
    )


def export(families: Sequence[str], splits: Sequence[str] = SPLITS) -> list[LabelledItem]:
    """The families' items as labelled items, family by family, each split in split order (the
    order `coolfusion calibrate` folds them in)."""
    return [labelled(item) for family in families for split in splits for item in items(family, split)]
