"""Checks of generated roles that a schema cannot express, reported at review time.

Each problem is one line naming the role and what looks wrong. They are warnings: the
dialogue stage adds the termination contract to every role prompt itself
(``templates/role.j2``), so a run still works, but a human should look.
"""

from __future__ import annotations

import re
from typing import Any

# How role prompts usually say who the model is: "act as a student", "play the role of ...".
_CASTING = re.compile(
    r"\b(?:act as|acting as|play(?:ing)? the (?:role|part) of|you are|you will be)"
    r"\s+([^.,;:!?\n]{0,80})",
    re.IGNORECASE,
)


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE) is not None


def lint_roles(roles_doc: dict[str, Any]) -> list[str]:
    """Problems in a schema-valid ``roles.json``: duplicate names, a ``declared_by`` that
    names no role, a declaring role whose prompt never mentions the done token, prompts
    that cast a role as another one (swapped), and an opening line addressed to its own
    speaker. An empty list means nothing was found."""
    roles = roles_doc["roles"]
    names = [role["name"] for role in roles]
    contract = roles_doc["termination"]
    token = contract["done_token"]
    problems = []

    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"roles share a name ({', '.join(duplicates)}); give each role its own")

    if contract["declared_by"] not in names:
        problems.append(
            f"termination.declared_by is {contract['declared_by']!r}, which is no role's name "
            f"({', '.join(names)}); any role's {token} will end the dialogue"
        )
    else:
        declarer = roles[names.index(contract["declared_by"])]
        if token not in declarer["system_prompt"]:
            problems.append(
                f"the prompt of {declarer['name']}, which declares the task done, never mentions "
                f"{token} (the pipeline adds it to the prompt when the dialogue runs)"
            )

    for i, role in enumerate(roles):
        cast_as = " ".join(m.group(1) for m in _CASTING.finditer(role["system_prompt"]))
        others = [n for j, n in enumerate(names) if j != i and n != role["name"]]
        if (
            cast_as
            and not _mentions(cast_as, role["name"])
            and any(_mentions(cast_as, other) for other in others)
        ):
            problems.append(
                f"the prompt of {role['name']} casts it as "
                f"{next(o for o in others if _mentions(cast_as, o))}: are two prompts swapped?"
            )

    speaker = names[0]
    opening = roles_doc["opening_line"].strip()
    if re.match(
        rf"^(?:dear\s+|hi\s+|hello\s+)?{re.escape(speaker)}\s*[,:!]", opening, re.IGNORECASE
    ):
        problems.append(
            f"the opening line is addressed to {speaker}, who says it; address it to "
            f"{', '.join(names[1:])}"
        )
    return problems
