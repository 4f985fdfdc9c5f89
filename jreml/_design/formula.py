"""Split an lme4 model formula into its response, fixed-effects part and random-effects terms.

Only the lme4-specific grammar is parsed here: ``(expr | group)`` and ``(expr || group)`` terms, with groups
``g``, ``a:b`` and ``a/b`` (= ``a`` + ``a:b``). The fixed part and each term's ``expr`` are left as text for
formulaic to expand (so ``x``, ``1 + x``, ``0 + x``, ``x - 1``, factors and transforms all work there).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


class FormulaError(ValueError):
    """A formula that cannot be parsed (the message names the offending part)."""


@dataclass(frozen=True)
class RandomSpec:
    """One random-effects term ``(expr | factors)``; ``correlated=False`` for ``||``."""

    expr: str
    factors: tuple[str, ...]
    correlated: bool = True

    @property
    def group(self) -> str:
        """The grouping factor's name as lme4 prints it (``"Subject"``, ``"Worker:Machine"``)."""
        return ":".join(self.factors)


@dataclass(frozen=True)
class ParsedFormula:
    text: str
    response: str
    fixed: str
    random: tuple[RandomSpec, ...]


def _split_top(text: str, sep: str, formula: str) -> list[str]:
    """Split ``text`` on the single character ``sep`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced ')' in formula {formula!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise FormulaError(f"unbalanced '(' in formula {formula!r}")
    parts.append(text[start:])
    return parts


def _enclosed(chunk: str) -> bool:
    """Whether ``chunk`` is one parenthesised group ``( ... )`` as a whole."""
    if not (chunk.startswith("(") and chunk.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(chunk):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(chunk) - 1:
            return False
    return True


def _clean_name(name: str, formula: str) -> str:
    name = name.strip()
    if name.startswith("`") and name.endswith("`") and len(name) > 2:
        return name[1:-1]
    if not _NAME.match(name):
        raise FormulaError(f"grouping factor {name!r} in formula {formula!r} is not a column name")
    return name


def _groups(text: str, formula: str) -> list[tuple[str, ...]]:
    """``a`` → [(a,)]; ``a:b`` → [(a, b)]; ``a/b`` → [(a,), (a, b)]; ``a/b/c`` → [(a,), (a, b), (a, b, c)]."""
    text = text.strip()
    while _enclosed(text):
        text = text[1:-1].strip()
    if not text:
        raise FormulaError(f"a random-effects term has no grouping factor in formula {formula!r}")
    out, prefix = [], ()
    for level in text.split("/"):
        names = tuple(_clean_name(n, formula) for n in level.split(":"))
        prefix = prefix + names
        out.append(prefix)
    return out


def _random_term(inner: str, formula: str) -> list[RandomSpec]:
    if "||" in inner:
        expr, _, group = inner.partition("||")
        correlated = False
    else:
        pieces = _split_top(inner, "|", formula)
        if len(pieces) != 2:
            raise FormulaError(f"random-effects term ({inner}) must have exactly one '|' in formula {formula!r}")
        expr, group = pieces
        correlated = True
    expr = expr.strip()
    if not expr:
        raise FormulaError(f"random-effects term ({inner}) has an empty left-hand side in formula {formula!r}")
    return [RandomSpec(expr, factors, correlated) for factors in _groups(group, formula)]


_CBIND = re.compile(r"^cbind\s*\((.*)\)$", re.DOTALL)


def cbind_arguments(response: str) -> tuple[str, str] | None:
    """``"cbind(s, n - s)"`` → ``("s", "n - s")`` (a binomial response as successes and failures, as in lme4's
    ``glmer``); None for any other response."""
    match = _CBIND.match(response.strip())
    if match is None:
        return None
    parts = [p.strip() for p in _split_top(match.group(1), ",", response)]
    if len(parts) != 2 or not all(parts):
        raise FormulaError(f"cbind() in the response {response!r} needs exactly two arguments (successes, failures)")
    return parts[0], parts[1]


def parse_formula(formula: str) -> ParsedFormula:
    """Split ``"y ~ fixed + (expr | g) + ..."`` into response, fixed part (``"1"`` if empty) and random terms."""
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, got {type(formula).__name__}")
    return _parse(formula)


@functools.lru_cache(maxsize=256)
def _parse(formula: str) -> ParsedFormula:
    text = " ".join(formula.split())
    sides = _split_top(text, "~", formula)
    if len(sides) != 2 or not sides[0].strip() or not sides[1].strip():
        raise FormulaError(f"formula {formula!r} must have the form 'response ~ terms'")
    response, rhs = sides[0].strip(), sides[1].strip()
    fixed, random = [], []
    for chunk in _split_top(rhs, "+", formula):
        chunk = chunk.strip()
        if not chunk:
            raise FormulaError(f"empty term (a stray '+') in formula {formula!r}")
        if _enclosed(chunk) and "|" in chunk:
            random.extend(_random_term(chunk[1:-1], formula))
        elif "|" in chunk:
            raise FormulaError(f"random-effects term {chunk!r} must be in parentheses in formula {formula!r}")
        else:
            fixed.append(chunk)
    return ParsedFormula(text, response, " + ".join(fixed) if fixed else "1", tuple(random))
