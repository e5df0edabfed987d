"""``pipeline curate``: memories worth learning from, as a fine-tuning dataset.

From the memory store (:mod:`pipeline.memory`, synced with the runs folder first) it takes
one role's memories, of runs the judge scored ``min_score`` or more and, with
``keep_only``, whose reflection said keep; forgotten memories are not in the store. Each
becomes the example :func:`pipeline.dataset.build_examples` makes of that turn (the
previous issue's ``chat`` and ``completion`` formats, ``context`` turns before it). Then:

**Near-duplicates** (``dedupe``): two turns are compared by the Jaccard similarity of
their sets of word 3-gram shingles (words: runs of letters and digits, case folded; a text
of fewer than three words is one shingle of all of them). Shingles see a turn that repeats
another with a few words changed, added or moved, which a model looping on its own
phrasing produces, while two turns that merely share vocabulary score low; the measure is
exact and deterministic. (MinHash only estimates it, to save time on millions of texts;
turns to curate are thousands, and an inverted index of shingles compares only turns that
share one.) Memories are taken best first: highest score, then by run and turn; one whose
similarity with a memory already taken is ``dedupe`` or more is dropped.

**At most** ``max_per_task`` memories per task, taken in the same order.

**Mixing** (``mix``, ``mix_ratio``): outside examples, a JSON Lines file in the dataset's
format, are the seed's defence against a model that learns only its own output. With
``n`` memories and a ratio ``r`` (0 ≤ r < 1), ``m = floor(n·r/(1-r) + 0.5)`` outside lines
are added, so they are the share ``m/(n+m)`` of the result, within half an example of
``r``. The lines taken are the ``m`` whose sha256 of ``"<seed>\\0<line number>"`` is
smallest, in file order; the ``k``-th (from 0) goes to line ``floor((2k+1)(n+m)/(2m))``
(from 0) of the result, spreading them evenly; the memories fill the other lines, by run
and turn. The same inputs and seed give the same file.

The dataset is checked and written by :mod:`pipeline.dataset_build`, with its sidecar
manifest: the memories (run id, turn, role, score, task and line in the file) under
``examples``, the outside lines (file, sha256, line numbers and where each went) under
``mixed``, and how it was curated under ``curation``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import dataset, dataset_build, memory
from .dataset import Example
from .errors import DatasetError, Fix
from .memory import Memory
from .records import JSONObject
from .runs import open_run

SHINGLE = 3
"""Words per shingle of the similarity measure."""
SIMILARITY = "Jaccard similarity of word 3-gram shingles"


class NothingToCurate(DatasetError):
    """No memory (left) qualifies for curation: not an error for a cycle, which waits."""


@dataclass(frozen=True)
class Duplicate:
    """A memory left out as a near-duplicate of ``of`` (run id, turn), which was taken."""

    run_id: str
    turn: int
    of: tuple[str, int]
    similarity: float


@dataclass(frozen=True)
class Mixed:
    """The outside examples in a curated dataset.

    Attributes:
        file, sha256: the file they come from, and its sha256 when read.
        lines: their line numbers in it (1-based), in the order they appear in the dataset.
        at: where each went in the dataset (1-based line).
    """

    file: Path
    sha256: str
    lines: tuple[int, ...]
    at: tuple[int, ...]


@dataclass(frozen=True)
class Curated:
    """A curated dataset, made and checked, not yet written (see :func:`write`).

    Attributes:
        built: the dataset (``train``; no validation part), checked and counted.
        memories: the memories it holds, in the order of the file, and ``at``: the line
            (1-based) of each.
        candidates: the memories that qualified before the near-duplicates and the cap.
        duplicates: those dropped as near-duplicates; ``over_cap``: those dropped by
            ``max_per_task`` (run id, turn).
        mixed: the outside examples, None without ``mix``.
        settings: how it was curated (role, min_score, keep_only, dedupe, max_per_task,
            mix_ratio, seed, similarity), as written in the sidecar.
    """

    built: dataset_build.Built
    memories: tuple[Memory, ...]
    at: tuple[int, ...]
    candidates: int
    duplicates: tuple[Duplicate, ...]
    over_cap: tuple[tuple[str, int], ...]
    mixed: Mixed | None
    settings: JSONObject


def shingles(text: str) -> frozenset[tuple[str, ...]]:
    """``text``'s word 3-gram shingles (see the module's documentation); a text without
    words is one shingle of itself, stripped and case folded."""
    words = re.findall(r"\w+", text.casefold())
    if len(words) < SHINGLE:
        return frozenset({tuple(words) or (text.strip().casefold(),)})
    return frozenset(tuple(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))


def similarity(a: frozenset[tuple[str, ...]], b: frozenset[tuple[str, ...]]) -> float:
    """The Jaccard similarity of two shingle sets: shared / all, from 0 to 1."""
    return len(a & b) / len(a | b) if a or b else 1.0


def curate(
    runs_dir: Path,
    *,
    role: str,
    min_score: float | None = None,
    keep_only: bool = False,
    dedupe: float | None = None,
    max_per_task: int | None = None,
    mix: Path | None = None,
    mix_ratio: float | None = None,
    fmt: str = "chat",
    context: int | None = dataset_build.DEFAULT_CONTEXT,
    seed: int = 0,
    base_model: str | None = None,
    exclude: Collection[tuple[str, int]] = (),
) -> Curated:
    """The dataset of ``role``'s memories in ``runs_dir`` chosen as the module's
    documentation says (``dedupe``: a similarity from 0 to 1, None for no dropping;
    ``base_model``: whose token limit the examples are checked against; ``exclude``: the
    ``(run id, turn)`` of memories to leave out, say those an earlier cycle used). The
    memory store is synced with the runs folder first.

    Raises:
        DatasetError: no memory qualifies, ``role`` says nothing in them, an argument is
            out of range, ``mix`` is given without ``mix_ratio`` (or the reverse), cannot
            be read, has a line that is not a JSON object, or has fewer lines than the
            ratio needs.
        MemoryStoreError, RunError: the memory store or a run cannot be read.
    """
    if (mix is None) != (mix_ratio is None):
        raise DatasetError(
            "an outside file and its share go together",
            fix=Fix("give both {} and {}", ("mix", "mix_ratio")),
        )
    if mix_ratio is not None and not 0 <= mix_ratio < 1:
        raise DatasetError(
            f"the mix ratio is {mix_ratio}; it must be from 0 up to (not including) 1",
            fix=Fix("give {} a share such as 0.2", ("mix_ratio",)),
        )
    if dedupe is not None and not 0 < dedupe <= 1:
        raise DatasetError(
            f"the dedupe threshold is {dedupe}; it must be above 0 and at most 1",
            fix=Fix("give {} a similarity such as 0.8", ("dedupe",)),
        )
    if max_per_task is not None and max_per_task < 1:
        raise DatasetError(
            f"at most {max_per_task} examples per task leaves none",
            fix=Fix("give {} 1 or more", ("max_per_task",)),
        )
    memory.sync(runs_dir)
    found = [
        m
        for m in memory.memories(runs_dir, role=role, min_score=min_score, keep_only=keep_only)
        if (m.run_id, m.turn) not in exclude
    ]
    examples = _examples(runs_dir, found, role, fmt, context)
    chosen = [m for m in found if (m.run_id, m.turn) in examples]
    if not chosen:
        raise NothingToCurate(
            f"no memory of {role} to curate"
            + (f" judged {min_score:g} or more" if min_score is not None else "")
            + (" that its reflection keeps" if keep_only else ""),
            fix=Fix("sync the memory, or lower {}", ("min_score",), ("memory", "sync")),
        )
    best_first = sorted(chosen, key=lambda m: (m.score is None, -(m.score or 0), m.run_id, m.turn))
    taken, duplicates = _dedupe(best_first, dedupe)
    taken, over_cap = _cap(taken, max_per_task)
    taken.sort(key=lambda m: (m.run_id, m.turn))
    bodies = [examples[m.run_id, m.turn] for m in taken]
    lines, at, mixed = _mix(bodies, mix, mix_ratio or 0.0, seed)
    settings: JSONObject = {
        "role": role,
        "min_score": min_score,
        "keep_only": keep_only,
        "dedupe": dedupe,
        "similarity": SIMILARITY,
        "max_per_task": max_per_task,
        "mix_ratio": mix_ratio,
        "seed": seed,
    }
    built = dataset_build.assemble(
        lines,
        runs=list(dict.fromkeys(m.run_id for m in taken)),
        speaker=role,
        fmt=fmt,
        context=context,
        base_model=base_model,
    )
    return Curated(
        built, tuple(taken), tuple(at), len(chosen), duplicates, over_cap, mixed, settings
    )


def _examples(
    runs_dir: Path, found: Sequence[Memory], role: str, fmt: str, context: int | None
) -> dict[tuple[str, int], Example]:
    """The example of each of ``found``'s turns, by (run id, turn), made from its run's
    transcript (a turn that makes none, an empty one, is not in it)."""
    if not found:
        return {}
    runs = [open_run(runs_dir, run_id) for run_id in dict.fromkeys(m.run_id for m in found)]
    sources = dataset_build.sources(runs, None)
    wanted = {(m.run_id, m.turn) for m in found}
    made = dataset.build_examples(sources, role, fmt=fmt, context=context)
    return {(e.run_id, e.turn): e for e in made if (e.run_id, e.turn) in wanted}


def _dedupe(
    best_first: Sequence[Memory], threshold: float | None
) -> tuple[list[Memory], tuple[Duplicate, ...]]:
    if threshold is None:
        return list(best_first), ()
    taken: list[Memory] = []
    sets: list[frozenset[tuple[str, ...]]] = []
    having: dict[tuple[str, ...], list[int]] = {}  # shingle -> the taken memories with it
    dropped = []
    for candidate in best_first:
        mine = shingles(candidate.content)
        best, of = 0.0, -1
        for i in sorted({i for s in mine for i in having.get(s, ())}):
            if (alike := similarity(mine, sets[i])) > best:
                best, of = alike, i  # the most similar; the first taken of equals
        if best >= threshold:
            other = taken[of]
            dropped.append(
                Duplicate(candidate.run_id, candidate.turn, (other.run_id, other.turn), best)
            )
            continue
        for s in mine:
            having.setdefault(s, []).append(len(taken))
        taken.append(candidate)
        sets.append(mine)
    return taken, tuple(dropped)


def _cap(
    best_first: Sequence[Memory], most: int | None
) -> tuple[list[Memory], tuple[tuple[str, int], ...]]:
    if most is None:
        return list(best_first), ()
    per_task: Counter[str] = Counter()
    taken: list[Memory] = []
    dropped: list[Memory] = []
    for m in best_first:
        per_task[m.task] += 1
        (taken if per_task[m.task] <= most else dropped).append(m)
    return taken, tuple((m.run_id, m.turn) for m in dropped)


def _mix(
    examples: list[Example], path: Path | None, ratio: float, seed: int
) -> tuple[list[Example], list[int], Mixed | None]:
    """The examples with the outside ones interleaved (the module's rule), the line
    (1-based) of each of ``examples`` in the result, and what was mixed in."""
    n = len(examples)
    if path is None:
        return examples, list(range(1, n + 1)), None
    lines, digest = _outside(path)
    wanted = int(n * ratio / (1 - ratio) + 0.5)
    if wanted > len(lines):
        raise DatasetError(
            f"{path} has {len(lines)} examples; a mix ratio of {ratio:g} with {n} memories "
            f"needs {wanted}",
            fix=Fix("lower {}, or add outside examples", ("mix_ratio",)),
            path=path,
        )

    def rank(number: int) -> str:
        return hashlib.sha256(f"{seed}\0{number}".encode()).hexdigest()

    picked = sorted(sorted(lines, key=rank)[:wanted])
    total = n + wanted
    places = {(2 * k + 1) * total // (2 * wanted): k for k in range(wanted)}
    result: list[Example] = []
    at: list[int] = []
    mine = iter(examples)
    for position in range(total):
        if position in places:
            number = picked[places[position]]
            result.append(Example(path.name, number, lines[number]))
        else:
            result.append(next(mine))
            at.append(position + 1)
    spots = tuple(sorted(p + 1 for p in places))
    return result, at, Mixed(path, digest, tuple(picked), spots)


def _outside(path: Path) -> tuple[dict[int, JSONObject], str]:
    """The examples of a JSON Lines file, by line number (blank lines skipped), and the
    file's sha256."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}", path=path) from e
    found: dict[int, JSONObject] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise DatasetError(
                f"line {number} of {path} is not a JSON object (an example)",
                fix=Fix("give {} a JSON Lines file in the dataset's format", ("mix",)),
                path=path,
            )
        found[number] = value
    return found, hashlib.sha256(data).hexdigest()


def write(curated: Curated, path: Path) -> list[Path]:
    """Write ``curated`` to ``path`` with its sidecar manifest (see the module's
    documentation and :func:`pipeline.dataset_build.write`); return the files written.

    Raises:
        DatasetError: a check found problems (nothing is written).
    """
    mixed = curated.mixed
    listing = [
        {
            "run_id": m.run_id,
            "turn": m.turn,
            "role": m.role,
            "score": m.score,
            "task": m.task,
            "line": line,
        }
        for m, line in zip(curated.memories, curated.at, strict=True)
    ]
    extra: JSONObject = {
        "examples": {"train": listing},
        "mixed": None
        if mixed is None
        else {
            "file": str(mixed.file),
            "sha256": mixed.sha256,
            "lines": [{"line": n, "at": at} for n, at in zip(mixed.lines, mixed.at, strict=True)],
        },
        "curation": {
            **curated.settings,
            "candidates": curated.candidates,
            "duplicates": [
                {"run_id": d.run_id, "turn": d.turn, "of": list(d.of), "similarity": d.similarity}
                for d in curated.duplicates
            ],
            "over_cap": [{"run_id": r, "turn": t} for r, t in curated.over_cap],
        },
    }
    return dataset_build.write(curated.built, path, manifest=extra)
