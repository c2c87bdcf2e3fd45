"""How items and users become text for the BERT encoder.

Item:    ``Toy Story (1995) | genres: Animation, Children's, Comedy``
Profile: ``age: 24 | gender: M | occupation: technician``
Context: ``age: 24 | gender: M | occupation: technician | history: <item> ; <item> ; ...``
(history most recent first, so truncating the context's tail drops the oldest items).

The pieces are joined with whitespace-separated punctuation, so for BERT's WordPiece
tokenizer the token ids of a context equal the concatenation of its pieces' token ids
(see ``recsys_ray.data.tokenize``) - items are tokenized once, not once per example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FIELD_SEP = " | "
HISTORY_PREFIX = "history:"
HISTORY_SEP = " ; "
EMPTY_HISTORY = "none"


def _clean(value: object) -> str:
    if value is None:
        return ""
    text = " ".join(str(value).split())  # one line, single spaces
    return text


def render_fields(values: Mapping[str, object], columns: Sequence[str], first_bare: bool) -> str:
    """``v1 | col2: v2 | ...`` over non-empty values; the first column unlabelled if ``first_bare``."""
    parts = []
    for i, col in enumerate(columns):
        text = _clean(values.get(col))
        if not text:
            continue
        parts.append(text if (first_bare and i == 0) else f"{col}: {text}")
    return FIELD_SEP.join(parts)


def render_item(values: Mapping[str, object], text_columns: Sequence[str]) -> str:
    """Item text from its catalogue row (first text column is the title, shown bare)."""
    return render_fields(values, text_columns, first_bare=True)


def render_profile(values: Mapping[str, object], profile_columns: Sequence[str]) -> str:
    """User profile text (every field labelled)."""
    return render_fields(values, profile_columns, first_bare=False)


def render_context(profile_text: str, history_texts: Sequence[str]) -> str:
    """User context: profile, then history item texts (caller passes them most recent first)."""
    history = HISTORY_SEP.join(history_texts) if history_texts else EMPTY_HISTORY
    body = f"{HISTORY_PREFIX} {history}"
    return f"{profile_text}{FIELD_SEP}{body}" if profile_text else body
