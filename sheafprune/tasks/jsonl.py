"""The user's own items from a JSON-lines file, validated line by line so every error names its line.

Two formats, one per file:
- `{"prompt": ..., "good": ..., "bad": ...}`: a two-way choice, candidates (good, bad), target 0;
- `{"prompt": ..., "answer": ...}`: multi-class; the candidates are every distinct answer in file order.
Candidates are continuations of the prompt. As in lm-eval (whose target_delimiter is " "), trailing
whitespace of the prompt moves to the candidates, and a candidate with no leading whitespace gets one
space: "Mary" after "gave a drink to" is scored as " Mary". Other keys on a line are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sheafprune.errors import UserError
from sheafprune.tasks.base import Item, Task, make_splits, token_ids

PAIR_KEYS = ("good", "bad")
ANSWER_KEY = "answer"
EXAMPLE = '{"prompt": "When Mary and John went out, John gave a drink to", "good": " Mary", "bad": " John"}'


def _join(prompt: str, candidate: str) -> tuple[str, str]:
    """(prompt without trailing whitespace, candidate with the whitespace that separates them)."""
    stripped = prompt.rstrip()
    gap = prompt[len(stripped) :]
    if not gap and not candidate[:1].isspace():
        gap = " "
    return stripped, gap + candidate


def _fields(row: Any, where: str) -> tuple[str, tuple[str, ...]]:
    """(prompt, raw candidates) of one parsed line; UserError unless exactly one format fits."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}; each line looks like {EXAMPLE}")
    has_pair, has_answer = any(k in row for k in PAIR_KEYS), ANSWER_KEY in row
    if has_pair == has_answer:
        what = "both 'good'/'bad' and 'answer'" if has_pair else "neither 'good'/'bad' nor 'answer'"
        raise UserError(f"{where}: has {what}; give \"good\" and \"bad\" (two-way) or \"answer\" (multi-class)")
    keys = ("prompt", *PAIR_KEYS) if has_pair else ("prompt", ANSWER_KEY)
    for key in keys:
        if key not in row:
            raise UserError(f"{where}: missing field {key!r}; each line looks like {EXAMPLE}")
        if not isinstance(row[key], str) or not row[key].strip():
            raise UserError(f"{where}: field {key!r} must be a non-empty string, got {row[key]!r}")
    return row["prompt"], tuple(row[k] for k in keys[1:])


def _read(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line number, prompt, raw candidates) for every non-blank line."""
    if not path.is_file():
        raise UserError(f"task file not found: {path}; jsonl:PATH needs an existing file of JSON lines")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read task file {path}: {e}; give a UTF-8 JSON-lines file") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg}, column {e.colno})"
            raise UserError(f"{where}: {reason}; each line looks like {EXAMPLE}") from None
        rows.append((lineno, *_fields(row, where)))
    if not rows:
        raise UserError(f"task file {path} is empty; put one JSON object a line, like {EXAMPLE}")
    return rows


def _check_tokens(path: Path, lines: list[tuple[int, Item]], tokenizer: Any, *, multi: bool) -> None:
    """Every prompt and candidate must give at least one token: the choice reads the first one."""
    # Multi-class lines share one vocabulary of answers, each of which is some line's own answer, so a
    # line is checked for its prompt and its own answer only.
    own = [
        (lineno, (item.prompt, item.candidates[item.target]) if multi else (item.prompt, *item.candidates))
        for lineno, item in lines
    ]
    texts = sorted({text for _, line_texts in own for text in line_texts})
    empty = {text for text, ids in zip(texts, token_ids(tokenizer, texts)) if not ids}
    for lineno, line_texts in own:
        for text in line_texts:
            if text in empty:
                raise UserError(f"{path}:{lineno}: {text!r} tokenizes to nothing; give text the tokenizer can encode")


def build(arg: str | None, *, seed: int, n: int | None, tokenizer: Any = None) -> Task:
    """The `jsonl:PATH` task; with a tokenizer, lines whose text tokenizes to nothing are errors."""
    if not arg:
        raise UserError("jsonl needs a file: use jsonl:PATH, e.g. jsonl:items.jsonl")
    path = Path(arg).expanduser().resolve()
    rows = _read(path)
    multi = len(rows[0][2]) == 1
    for lineno, _, cands in rows:
        if (len(cands) == 1) != multi:
            first = "'answer'" if multi else "'good'/'bad'"
            raise UserError(f"{path}:{lineno}: mixes formats (line {rows[0][0]} uses {first}); use one format per file")
    lines: list[tuple[int, Item]] = []
    if multi:
        joined = [(lineno, *_join(prompt, cands[0])) for lineno, prompt, cands in rows]
        vocab = tuple(dict.fromkeys(answer for _, _, answer in joined))  # distinct, file order
        if len(vocab) < 2:
            only = vocab[0]
            raise UserError(f"{path}: every line has the answer {only!r}; a multi-class task needs 2+ distinct answers")
        lines = [(lineno, Item(prompt, vocab, vocab.index(answer))) for lineno, prompt, answer in joined]
    else:
        for lineno, prompt, (good, bad) in rows:
            (stripped, good), (_, bad) = _join(prompt, good), _join(prompt, bad)
            if good == bad:
                raise UserError(f"{path}:{lineno}: 'good' and 'bad' are the same text {good!r}; make them differ")
            lines.append((lineno, Item(stripped, (good, bad), 0)))
    if tokenizer is not None:
        _check_tokens(path, lines, tokenizer, multi=multi)
    items = [item for _, item in lines]
    return Task(name=f"jsonl:{path}", kind="choice", splits=make_splits(items, seed=seed, n=n))
