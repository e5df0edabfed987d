"""Checks of generated roles that a schema cannot express.

:func:`roles_problems` finds what makes roles unusable (two roles with one name, a
declaring role that is no role, an opening line addressed to its own speaker): the
director sends these back to the model for repair, like schema errors, and a hand edit
with one is refused. :func:`lint_roles` finds softer problems, reported at review time
as warnings: the dialogue stage adds the termination contract to every role prompt itself
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


def self_address(roles_doc: dict[str, Any]) -> re.Match[str] | None:
    """Where the opening line addresses the first role, who speaks it (``"Anna, ..."``,
    ``"Hi Anna: ..."``), or None."""
    speaker = roles_doc["roles"][0]["name"].strip()
    return re.match(
        rf"^\s*(?:dear\s+|hi\s+|hello\s+)?{re.escape(speaker)}\s*[,:!]\s*",
        roles_doc["opening_line"],
        re.IGNORECASE,
    )


def roles_problems(roles_doc: dict[str, Any]) -> list[str]:
    """What makes a schema-valid ``roles.json`` unusable, as ``"<json path>: <message>"``
    lines (the form of schema errors, so that a model can be asked to repair them): roles
    sharing a name, a ``declared_by`` that names no role, an opening line addressed to
    the role that speaks it. An empty list means none was found."""
    names = [role["name"] for role in roles_doc["roles"]]
    problems = []
    for i, name in enumerate(names):
        if name.strip().casefold() in (n.strip().casefold() for n in names[:i]):
            problems.append(
                f"$.roles[{i}].name: {name!r} is the name of an earlier role; "
                "give each role a name of its own"
            )
    declared_by = roles_doc["termination"]["declared_by"]
    if declared_by not in names:
        problems.append(
            f"$.termination.declared_by: {declared_by!r} is no role's name; "
            f"use one of {', '.join(repr(n) for n in names)}"
        )
    speaker = names[0]
    if self_address(roles_doc):
        problems.append(
            f"$.opening_line: it is addressed to {speaker!r}, who speaks it; address it to "
            f"{', '.join(repr(n) for n in names[1:])}"
        )
    return problems


def lint_roles(roles_doc: dict[str, Any]) -> list[str]:
    """Softer problems in a usable ``roles.json`` (see :func:`roles_problems`): a declaring
    role whose prompt never mentions the done token, and prompts that cast a role as
    another one (swapped). An empty list means nothing was found."""
    roles = roles_doc["roles"]
    names = [role["name"] for role in roles]
    contract = roles_doc["termination"]
    token = contract["done_token"]
    problems = []
    if contract["declared_by"] in names:
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
    return problems
