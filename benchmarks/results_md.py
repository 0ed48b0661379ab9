"""One generated block of benchmarks/RESULTS.md: replace it between its markers, or append it.

Each benchmark script owns a block between ``<!-- KEY:begin -->`` and ``<!-- KEY:end -->`` that it
regenerates from its committed JSON; everything outside the block (other scripts' blocks, prose) is
left byte for byte as it was. The logic is benchmarks/search_quality.py's ``record_section``, plus a
heading for a block written for the first time and an error, instead of a second copy of the
block, where the markers are not one begin followed by one end.
"""
from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def record_section(key: str, markdown: str, path: Path = RESULTS_MD, heading: str | None = None) -> None:
    """Write ``markdown`` between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in ``path``.

    The block is the begin marker, ``markdown`` without its trailing whitespace, and the end marker,
    each on its own line. Where the file has the block, it is replaced in place and nothing else
    changes. Where it has neither marker, the block is appended after one blank line, preceded by
    ``heading`` (a ``## ...`` line) and a blank line when one is given; a missing file starts as
    ``# Benchmark results``. A begin without an end after it, an end without a begin, or either
    marker twice raises ``ValueError`` naming the file and the key (the file is left as it was).
    """
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    n_begin, n_end = text.count(begin), text.count(end)
    if (n_begin, n_end) == (0, 0):
        text = text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    elif (n_begin, n_end) == (1, 1) and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        raise ValueError(f"{path}: the {key!r} block's markers are broken ({n_begin} x {begin}, {n_end} x {end}; "
                         "expected one begin followed by one end, or neither): fix the file by hand")
    path.write_text(text)
    print(f"recorded in {path} ({key})")
