"""benchmarks/results_md.py: a script's block of RESULTS.md replaced in place or appended, checked
against whole files written out by hand; everything outside the block byte for byte as it was."""
from __future__ import annotations


import pytest

from benchmark_modules import load_benchmark

record_section = load_benchmark("results_md").record_section

# Other blocks, prose, a blank line kept before the block and trailing spaces on a line that is not ours.
BEFORE = "# Benchmark results\n\nintro  \n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n\n## Mine\n\n"
AFTER = "\n\nafter, not ours\n<!-- later:begin -->\nx\n<!-- later:end -->\n"


def test_replaces_the_block_and_nothing_else(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE + "<!-- mine:begin -->\nold line\n\nold table\n<!-- mine:end -->" + AFTER)
    record_section("mine", "| a | b |\n|---|---|\n| 1 | 2 |\n\n\n", path, heading="## Not written again")
    block = "<!-- mine:begin -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- mine:end -->"
    assert path.read_text() == BEFORE + block + AFTER


def test_replacing_twice_gives_the_same_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE + "<!-- mine:begin -->\nold\n<!-- mine:end -->" + AFTER)
    record_section("mine", "new\n", path)
    once = path.read_text()
    record_section("mine", "new\n", path)
    assert path.read_text() == once == BEFORE + "<!-- mine:begin -->\nnew\n<!-- mine:end -->" + AFTER


def test_a_key_that_contains_another_keys_name_leaves_that_block_alone(tmp_path):
    path = tmp_path / "RESULTS.md"
    text = ("<!-- racing:begin -->\nr\n<!-- racing:end -->\n"
            "<!-- finalist_racing:begin -->\nf\n<!-- finalist_racing:end -->\n")
    path.write_text(text)
    record_section("racing", "R", path)
    assert path.read_text() == text.replace("\nr\n", "\nR\n")


def test_appends_a_new_block_with_its_heading(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nlast line\n\n\n")
    record_section("new", "body\n", path, heading="## New (issue 1)")
    assert path.read_text() == ("# Benchmark results\n\nlast line\n\n"
                                "## New (issue 1)\n\n<!-- new:begin -->\nbody\n<!-- new:end -->\n")


def test_appends_a_new_block_without_a_heading(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nlast line")
    record_section("new", "## Heading inside the block\n\nbody", path)
    assert path.read_text() == ("# Benchmark results\n\nlast line\n\n"
                                "<!-- new:begin -->\n## Heading inside the block\n\nbody\n<!-- new:end -->\n")


def test_a_missing_file_starts_with_the_title(tmp_path):
    path = tmp_path / "RESULTS.md"
    record_section("new", "body", path)
    assert path.read_text() == "# Benchmark results\n\n<!-- new:begin -->\nbody\n<!-- new:end -->\n"


@pytest.mark.parametrize("broken", [
    "<!-- mine:begin -->\nno end\n",  # a begin without an end: not appended a second time
    "<!-- mine:end -->\n<!-- mine:begin -->\nreversed\n",
    "no begin\n<!-- mine:end -->\n",
    "<!-- mine:begin -->\na\n<!-- mine:end -->\n<!-- mine:begin -->\nb\n<!-- mine:end -->\n",
])
def test_broken_markers_raise_naming_the_file_and_the_key_and_leave_the_file_alone(tmp_path, broken):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE + broken + AFTER)
    with pytest.raises(ValueError, match=r"RESULTS\.md: the 'mine' block's markers are broken") as error:
        record_section("mine", "new", path)
    assert str(path) in str(error.value)
    assert path.read_text() == BEFORE + broken + AFTER
