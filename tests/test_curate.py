"""Curation (pipeline.curate, `pipeline curate`): memories into a fine-tuning dataset, by
score and reflection, near-duplicates dropped, capped per task, outside examples mixed in,
with a sidecar listing every memory; runs made on disk (tests/memoryruns.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline import curate, memory
from pipeline.errors import DatasetError

from .memoryruns import finished_run

WORDS = ["soil", "water", "light", "seeds", "chain", "brakes", "tyres", "gears"]


def mentor_run(runs_dir: Path, task: str, label: str, score: int | None, **kw: object) -> str:
    """A run of 8 turns whose 4 Mentor turns (2, 4, 6, 8) say things no other run says."""
    texts = []
    for turn in range(1, 9):
        if turn % 2:
            texts.append(f"What next about {task}, question {turn}?")
        else:
            word = WORDS[(turn + len(label)) % len(WORDS)]
            texts.append(
                f"Advice {turn} of run {label}: mind the {word} well before anything {label}."
            )
    return finished_run(runs_dir, task, texts, score=score, **kw).run_id  # type: ignore[arg-type]


@pytest.fixture
def runs(runs_dir: Path, tiktoken_offline: Path) -> dict[str, str]:
    """Two garden runs (scores 9, 7), two bike runs (8, 3) and an unjudged poem; every
    Mentor kept by its reflection but in the second garden run."""
    return {
        "a": mentor_run(runs_dir, "plan a garden", "a", 9, keep={"Mentor": True}),
        "b": mentor_run(runs_dir, "plan a garden", "b", 7, keep={"Mentor": False}),
        "c": mentor_run(runs_dir, "fix a bike", "c", 8, keep={"Mentor": True, "Student": False}),
        "d": mentor_run(runs_dir, "fix a bike", "d", 3, keep={"Mentor": True}),
        "e": mentor_run(runs_dir, "write a poem", "e", None),
    }


def held(curated: curate.Curated) -> list[tuple[str, int]]:
    return [(m.run_id, m.turn) for m in curated.memories]


def of(*run_ids: str) -> list[tuple[str, int]]:
    return sorted((r, t) for r in run_ids for t in (2, 4, 6, 8))


def test_min_score_selects_memories_and_the_sidecar_lists_each(runs, runs_dir, tmp_path):
    a, b, c = runs["a"], runs["b"], runs["c"]
    curated = curate.curate(runs_dir, role="Mentor", min_score=7)
    assert held(curated) == of(a, b, c) and curated.candidates == 12
    out = tmp_path / "mentor.jsonl"
    sidecar = tmp_path / "mentor.jsonl.manifest.json"
    assert curate.write(curated, out) == [out, sidecar]

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    contents = [m.content for m in curated.memories]
    assert [line["messages"][-1]["content"] for line in lines] == contents
    assert all(line["messages"][-1]["role"] == "assistant" for line in lines)
    manifest = json.loads(sidecar.read_text())
    tasks = {a: "plan a garden", b: "plan a garden", c: "fix a bike"}
    scores = {a: 9, b: 7, c: 8}
    assert manifest["examples"] == {
        "train": [
            {
                "run_id": r,
                "turn": t,
                "role": "Mentor",
                "score": scores[r],
                "task": tasks[r],
                "line": n,
            }
            for n, (r, t) in enumerate(of(a, b, c), start=1)
        ]
    }
    assert manifest["runs"] == sorted([a, b, c]) and manifest["speaker"] == "Mentor"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["files"]["train"] == {"path": out.name, "sha256": digest, "examples": 12}
    assert manifest["mixed"] is None
    assert manifest["curation"] == {
        "role": "Mentor",
        "min_score": 7,
        "keep_only": False,
        "dedupe": None,
        "similarity": "Jaccard similarity of word 3-gram shingles",
        "max_per_task": None,
        "mix_ratio": None,
        "seed": 0,
        "candidates": 12,
        "duplicates": [],
        "over_cap": [],
    }

    completion = curate.curate(runs_dir, role="Mentor", min_score=7, fmt="completion")
    bodies = [e.body for e in completion.built.train]
    assert [b["completion"] for b in bodies] == [f" {text} END" for text in contents]


def test_keep_only_takes_the_turns_their_reflection_keeps(runs, runs_dir):
    curated = curate.curate(runs_dir, role="Mentor", min_score=1, keep_only=True)
    assert held(curated) == of(runs["a"], runs["c"], runs["d"])
    with pytest.raises(
        DatasetError,
        match="no memory of Student to curate judged 8 or more that its reflection keeps",
    ):
        curate.curate(runs_dir, role="Student", keep_only=True, min_score=8)


def test_forgotten_memories_are_not_curated(runs, runs_dir):
    memory.sync(runs_dir)
    memory.forget(runs_dir, run_id=runs["a"])
    curated = curate.curate(runs_dir, role="Mentor", min_score=1)
    assert held(curated) == of(runs["b"], runs["c"], runs["d"])


def test_near_duplicates_are_dropped_keeping_the_best_scored(runs, runs_dir):
    a = runs["a"]
    memory.sync(runs_dir)
    (original,) = [m for m in memory.memories(runs_dir, role="Mentor") if m.run_id == a][:1]
    # twelve words, the last one changed: 9 of the 11 distinct 3-word shingles are shared
    assert len(original.content.split()) == 12
    near = original.content.rsplit(" ", 1)[0] + " first."
    texts = [
        "Shall we?",
        near,
        "And then?",
        "Water the soil at dawn, every day, come rain or shine.",
    ]
    texts += ["Fine.", "Prune the roses in March, never later than the first week."]
    texts += ["Thanks.", "Good luck with the garden and its many roses and weeds."]
    echo = finished_run(runs_dir, "tend a garden", texts, score=8).run_id
    alike = curate.similarity(curate.shingles(original.content), curate.shingles(near))
    assert alike == 9 / 11

    loose = curate.curate(runs_dir, role="Mentor", min_score=7, dedupe=0.9)
    assert (echo, 2) in held(loose) and loose.duplicates == ()
    strict = curate.curate(runs_dir, role="Mentor", min_score=7, dedupe=0.8)
    assert (echo, 2) not in held(strict) and len(strict.memories) == 15
    assert strict.duplicates == (curate.Duplicate(echo, 2, (a, original.turn), 9 / 11),)
    # case, punctuation and spacing do not count; the measure is symmetric
    assert curate.similarity(curate.shingles("A b, C d!"), curate.shingles("a  B c D")) == 1.0
    assert curate.similarity(curate.shingles("ok"), curate.shingles("OK.")) == 1.0


def test_at_most_max_per_task_examples_per_task_best_scored_first(runs, runs_dir):
    curated = curate.curate(runs_dir, role="Mentor", min_score=1, max_per_task=6)
    a, b, c, d = runs["a"], runs["b"], runs["c"], runs["d"]
    kept = [*of(a, c), (b, 2), (b, 4), (d, 2), (d, 4)]
    assert held(curated) == sorted(kept)
    assert sorted(curated.over_cap) == sorted([(b, 6), (b, 8), (d, 6), (d, 8)])
    assert {m.task for m in curated.memories} == {"plan a garden", "fix a bike"}


def outside(path: Path, count: int) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"Outside question {n}?"},
                                 {"role": "assistant", "content": f"Outside answer {n}."}]})
        for n in range(1, count + 1)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def picked(seed: int, lines: int, wanted: int) -> list[int]:
    """The documented rule: the lines whose sha256 of "<seed>\\0<line>" is smallest."""
    key = lambda n: hashlib.sha256(f"{seed}\0{n}".encode()).hexdigest()  # noqa: E731
    return sorted(sorted(range(1, lines + 1), key=key)[:wanted])


def test_outside_examples_are_mixed_in_at_the_ratio_by_a_seeded_rule(runs, runs_dir, tmp_path):
    extra = outside(tmp_path / "outside.jsonl", 10)
    mixed = curate.curate(runs_dir, role="Mentor", min_score=7, mix=extra, mix_ratio=0.25)
    assert mixed.mixed is not None and len(mixed.memories) == 12
    chosen = picked(0, 10, 4)  # 12 memories * 0.25 / 0.75 = 4 outside lines: 4 / 16 = 0.25
    assert mixed.mixed.lines == tuple(chosen) and mixed.mixed.at == (3, 7, 11, 15)
    assert mixed.at == tuple(n for n in range(1, 17) if n not in (3, 7, 11, 15))

    out = tmp_path / "mixed.jsonl"
    curate.write(mixed, out)
    written = out.read_text().splitlines()
    source = extra.read_text().splitlines()
    assert [written[at - 1] for at in (3, 7, 11, 15)] == [source[n - 1] for n in chosen]
    manifest = json.loads((tmp_path / "mixed.jsonl.manifest.json").read_text())
    assert manifest["mixed"] == {
        "file": str(extra),
        "sha256": hashlib.sha256(extra.read_bytes()).hexdigest(),
        "lines": [{"line": n, "at": at} for n, at in zip(chosen, (3, 7, 11, 15), strict=True)],
    }
    assert [e["line"] for e in manifest["examples"]["train"]] == list(mixed.at)

    again = tmp_path / "again.jsonl"
    curate.write(
        curate.curate(runs_dir, role="Mentor", min_score=7, mix=extra, mix_ratio=0.25), again
    )
    assert again.read_bytes() == out.read_bytes()  # same inputs and seed: same file
    other = curate.curate(runs_dir, role="Mentor", min_score=7, mix=extra, mix_ratio=0.3, seed=7)
    assert other.mixed is not None and other.mixed.lines == tuple(picked(7, 10, 5))  # 5.14 -> 5
    assert other.mixed.at == (2, 6, 9, 12, 16)  # floor((2k + 1) * 17 / 10) + 1

    with pytest.raises(
        DatasetError, match=r"has 10 examples; a mix ratio of 0\.5 with 12 memories needs 12"
    ):
        curate.curate(runs_dir, role="Mentor", min_score=7, mix=extra, mix_ratio=0.5)
    with pytest.raises(DatasetError, match="go together"):
        curate.curate(runs_dir, role="Mentor", min_score=7, mix=extra)
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n[1]\n')
    with pytest.raises(DatasetError, match=r"line 2 of .*bad\.jsonl is not a JSON object"):
        curate.curate(
            runs_dir, role="Mentor", min_score=7, mix=tmp_path / "bad.jsonl", mix_ratio=0.1
        )


def test_the_curate_command(runs, runs_dir, invoke, tmp_path):
    extra = outside(tmp_path / "outside.jsonl", 10)
    out = tmp_path / "data.jsonl"
    result = invoke("curate", "--role", "Mentor", "--min-score", "7", "--dedupe", "0.8",
                    "--max-per-task", "8", "--mix", str(extra), "--mix-ratio", "0.25",
                    "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n{out}.manifest.json\n"
    assert result.stderr.splitlines()[:3] == [
        "12 memories qualified; 0 near-duplicates dropped, 0 over the per-task cap; 12 kept",
        f"4 outside examples from {extra} (25.0% of the dataset)",
        "16 training examples from 3 runs, speaker Mentor",
    ]
    assert len(out.read_text().splitlines()) == 16

    alone = invoke("curate", "--role", "Mentor", "--min-score", "7", "--mix", str(extra),
                   "-o", str(out))  # fmt: skip
    assert alone.exit_code == 2 and "--mix and --mix-ratio go together" in alone.stderr
    few = invoke("curate", "--role", "Mentor", "--min-score", "9", "-o", str(tmp_path / "x.jsonl"))
    assert few.exit_code == 1
    assert "not written: 4 examples; fine-tuning needs at least 10" in few.stderr
    assert not (tmp_path / "x.jsonl").exists()
