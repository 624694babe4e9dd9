"""The shapes of a classical poem, in one place: clauses, regular form and the four forms.

Two words a reader meets everywhere:

- a **clause** (句): the text between two punctuation marks or line breaks; the unit a
  form counts (a 五言絕句 is 4 clauses of 5 characters);
- a **text line**: a line of the text as the corpus stores it (`Poem.lines`), usually one
  couplet, two clauses.

Regular form is the shape of the 絕句 and 律詩: every clause 5 characters, or every clause
7, and an even number of clauses (clauses pair into couplets). data/tasks.py builds the
form and acrostic tasks from these rules, tanggpt/metrics.py measures answers by them,
tanggpt/prosody.py checks the rhyme and tones of the clauses they find, and
tanggpt/rewards.py gives partial credit for a form partly kept (form_share).
"""

from __future__ import annotations

import re

CLAUSE_BREAK = re.compile(r"[，。？！；：、,.?!;:\n]+")
CLAUSE_TEXT = re.compile(r"[^，。？！；：、,.?!;:\n]+")  # a clause's characters: everything CLAUSE_BREAK is not

# The four forms of regulated verse: (characters per clause, clauses).
FORMS = {"五言絕句": (5, 4), "七言絕句": (7, 4), "五言律詩": (5, 8), "七言律詩": (7, 8)}
CLAUSE_LENGTHS = sorted({length for length, _ in FORMS.values()})  # 5 and 7
MOST_CLAUSES = max(count for _, count in FORMS.values())  # a 律詩's 8


def clauses(poem: str) -> list[str]:
    """The poem's clauses: text between punctuation and line breaks, blanks dropped."""
    return [c.strip() for c in CLAUSE_BREAK.split(poem) if c.strip()]


def is_regular_form(poem: str) -> bool:
    """Every clause 5 characters, or every clause 7, and an even number (at least 2) of clauses."""
    parts = clauses(poem)
    if len(parts) < 2 or len(parts) % 2:
        return False
    lengths = {len(c) for c in parts}
    return len(lengths) == 1 and lengths.pop() in CLAUSE_LENGTHS


def form_share(poem: str, form: str) -> float:
    """How much of `form` (one of FORMS) the poem has: its clauses, up to the form's count,
    that have the form's length, over the form's clause count or the poem's, whichever is
    larger. A clause missing, one too many, or one of the wrong length each costs a share;
    1.0 exactly when the poem has the form. The RL stage's partial credit (tanggpt/rewards.py)."""
    length, count = FORMS[form]
    parts = clauses(poem)
    return sum(len(c) == length for c in parts[:count]) / max(count, len(parts))


def form_name(poem: str) -> str | None:
    """五言絕句, 七言絕句, 五言律詩 or 七言律詩 when the poem has that shape (4 or 8 clauses, all
    5 or all 7 characters), else None."""
    return next((name for name in FORMS if form_share(poem, name) == 1.0), None)


def regular_clauses(poem: str) -> list[str] | None:
    """The clauses of a 絕句 or 律詩 (one of FORMS), else None: what the prosody checks read."""
    return clauses(poem) if form_name(poem) else None


def acrostic_head(poem: str) -> str:
    """The first character of each clause: what a 藏頭詩 (acrostic) hides in its clauses."""
    return "".join(c[0] for c in clauses(poem))
