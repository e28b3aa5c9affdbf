"""Prompt sets: the built-in files, the loader's validation (file and line in every message), rendering
and the content hash."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from f2d_bench.errors import F2DBenchError
from f2d_bench.prompts import (
    CATEGORIES,
    PLACEHOLDER,
    PROMPTS_DIR,
    Prompt,
    PromptSet,
    PromptSetError,
    available_prompt_sets,
    load_prompt_set,
)

# A valid set whose line numbers the error tests below count from (line 1 is "name: tiny").
VALID = """\
name: tiny
version: "1"
description: a tiny set for tests
class_phrase: a person
reference:
  id: ref
  template: "a photo of {}"
prompts:
  - id: job-chef
    category: job
    template: "{} as a chef"
  - id: activity-guitar
    category: activity
    template: "{} playing the guitar"
"""


def write(tmp_path: Path, text: str, name: str = "bad-set.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def expect_error(tmp_path: Path, text: str, line: int, *fragments: str) -> PromptSetError:
    """Load ``text`` and check that the error names the file, the line and each fragment."""
    path = write(tmp_path, text)
    with pytest.raises(PromptSetError) as info:
        load_prompt_set(path)
    message = str(info.value)
    assert f"{path.name}:{line}:" in message, message
    assert info.value.line == line
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# --- the built-in sets -------------------------------------------------------------------------------


def test_human40_has_40_prompts_10_per_category():
    prompt_set = load_prompt_set("human40")
    assert prompt_set.name == "human40"
    assert len(prompt_set.prompts) == 40
    assert Counter(p.category for p in prompt_set.prompts) == {c: 10 for c in CATEGORIES}
    assert prompt_set.categories() == CATEGORIES


def test_human40_ids_are_unique_and_category_prefixed():
    prompt_set = load_prompt_set("human40")
    ids = prompt_set.ids()
    assert len(set(ids)) == len(ids) == 40
    assert "ref" not in ids
    for prompt in prompt_set.prompts:
        assert prompt.id.startswith(prompt.category + "-"), prompt.id


def test_human40_templates_have_one_placeholder_and_render_with_the_class_phrase():
    prompt_set = load_prompt_set("human40")
    assert prompt_set.class_phrase == "a person"
    assert len({p.template for p in prompt_set.prompts}) == 40
    for prompt in prompt_set.all_prompts():
        assert prompt.template.count(PLACEHOLDER) == 1, prompt
        text = prompt.render(prompt_set.class_phrase)
        assert "a person" in text and "{" not in text and "}" not in text, text
        assert "person's" not in text and "  " not in text, text
    assert prompt_set.by_id("job-chef").render("a person") == "a person as a chef in a restaurant kitchen"


def test_reference_prompt_is_a_photo_of_the_subject_and_comes_last():
    prompt_set = load_prompt_set("human40")
    assert prompt_set.reference == Prompt("ref", "reference", "a photo of {}")
    # dCLIP's reference text (PROTOCOL.md section 2).
    assert prompt_set.reference.render(prompt_set.class_phrase) == "a photo of a person"
    assert prompt_set.all_prompts()[-1] == prompt_set.reference
    assert prompt_set.all_prompts()[:-1] == prompt_set.prompts
    assert prompt_set.by_id("ref") is prompt_set.reference


def test_smoke_loads_one_prompt_per_category_taken_from_human40():
    smoke = load_prompt_set("smoke")
    human40 = load_prompt_set("human40")
    assert len(smoke.prompts) == 4
    assert sorted(p.category for p in smoke.prompts) == sorted(CATEGORIES)
    for prompt in smoke.prompts:
        assert human40.by_id(prompt.id) == prompt
    assert smoke.reference == human40.reference
    assert smoke.class_phrase == human40.class_phrase


def test_built_in_names_and_paths_resolve_to_the_same_set():
    assert {"human40", "smoke"} <= set(available_prompt_sets())
    by_name = load_prompt_set("smoke")
    by_path = load_prompt_set(PROMPTS_DIR / "smoke.yaml")
    by_str_path = load_prompt_set(str(PROMPTS_DIR / "smoke.yaml"))
    assert by_name == by_path == by_str_path
    assert by_name.source == PROMPTS_DIR / "smoke.yaml"


def test_unknown_name_lists_the_available_sets():
    with pytest.raises(PromptSetError) as info:
        load_prompt_set("human41")
    message = str(info.value)
    assert "human41" in message and "human40" in message and "smoke" in message
    assert isinstance(info.value, F2DBenchError)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(PromptSetError, match="nowhere.yaml"):
        load_prompt_set(missing)


def test_by_id_unknown_id_lists_the_ids():
    with pytest.raises(PromptSetError, match="job-chef"):
        load_prompt_set("smoke").by_id("job-astronaut")


def test_valid_test_set_loads(tmp_path):
    # The error tests below edit VALID; this shows their errors come from the edit, not from VALID.
    prompt_set = load_prompt_set(write(tmp_path, VALID, "tiny.yaml"))
    assert prompt_set.ids() == ("job-chef", "activity-guitar")
    assert prompt_set.categories() == ("job", "activity")
    assert prompt_set.version == "1"
    assert prompt_set.description == "a tiny set for tests"


# --- validation: each error names the file and the line ----------------------------------------------


@pytest.mark.parametrize(
    "template, fragment",
    [("a chef", "no subject placeholder"), ("{} and {} as chefs", "2 subject placeholders"),
     ("{subject} as a chef", "no subject placeholder")],
)
def test_template_without_exactly_one_placeholder(tmp_path, template, fragment):
    text = VALID.replace('"{} as a chef"', f'"{template}"')
    assert text != VALID
    expect_error(tmp_path, text, 11, fragment, "exactly one {}")


def test_placeholder_error_in_the_reference_prompt(tmp_path):
    text = VALID.replace('"a photo of {}"', '"a photo"')
    expect_error(tmp_path, text, 7, "reference", "no subject placeholder")


def test_unquoted_placeholder_is_explained(tmp_path):
    # An unquoted "{} laughing" is a YAML syntax error; "template: {}" alone is an empty mapping.
    expect_error(tmp_path, VALID.replace('"{} as a chef"', "{} as a chef"), 11, "malformed YAML", "quote")
    expect_error(tmp_path, VALID.replace('"{} as a chef"', "{}"), 11, "empty mapping", "quote")


def test_duplicate_id(tmp_path):
    text = VALID.replace("id: activity-guitar", "id: job-chef")
    expect_error(tmp_path, text, 12, "duplicate id 'job-chef'", "line 9")


def test_id_equal_to_the_reference_id(tmp_path):
    text = VALID.replace("id: activity-guitar", "id: ref")
    expect_error(tmp_path, text, 12, "reference prompt's id", "line 6")


def test_unknown_category(tmp_path):
    text = VALID.replace("category: activity", "category: sport")
    expect_error(tmp_path, text, 13, "unknown category 'sport'", "job, activity, expression, location")


def test_reference_category_is_reserved(tmp_path):
    text = VALID.replace("category: activity", "category: reference")
    expect_error(tmp_path, text, 13, "unknown category 'reference'")


def test_missing_field(tmp_path):
    text = VALID.replace("    category: activity\n", "")
    expect_error(tmp_path, text, 12, "missing the field category")


def test_missing_top_level_field(tmp_path):
    text = VALID.replace("class_phrase: a person\n", "")
    expect_error(tmp_path, text, 1, "missing the field class_phrase")


def test_unknown_field(tmp_path):
    text = VALID.replace("    category: activity\n", "    category: activity\n    negative: blurry\n")
    expect_error(tmp_path, text, 14, "unknown field 'negative'", "id, category, template")


def test_unknown_top_level_field(tmp_path):
    expect_error(tmp_path, VALID.replace("description:", "descripton:"), 3, "unknown field 'descripton'")


def test_field_given_twice(tmp_path):
    text = VALID.replace("    category: job\n", "    category: job\n    category: activity\n")
    expect_error(tmp_path, text, 11, "'category' twice", "line 10")


@pytest.mark.parametrize("bad_id", ["Job-Chef", "job_chef", "-chef", "job chef"])
def test_invalid_id(tmp_path, bad_id):
    text = VALID.replace("id: activity-guitar", f'id: "{bad_id}"')
    expect_error(tmp_path, text, 12, f"invalid id {bad_id!r}")


def test_id_with_trailing_newline_is_invalid(tmp_path):
    # "$" in a regex would accept "job-x\n"; ids become directory names.
    text = VALID.replace("id: activity-guitar", 'id: "activity-guitar\\n"')
    expect_error(tmp_path, text, 12, "invalid id")


def test_malformed_yaml_names_the_parser_line(tmp_path):
    text = VALID.replace("    category: activity\n", "    category: [activity\n")
    error = expect_error(tmp_path, text, 14, "malformed YAML")
    assert error.path == tmp_path / "bad-set.yaml"


def test_tab_indentation_is_malformed_yaml(tmp_path):
    text = VALID.replace("  - id: activity-guitar\n", "\t- id: activity-guitar\n")
    error = expect_error(tmp_path, text, 12, "malformed YAML")
    # The quoting hint is for lines with a "{"; here it would mislead.
    assert "quote" not in str(error)


def test_control_character_names_its_line(tmp_path):
    # PyYAML's ReaderError gives a character position, not a line.
    expect_error(tmp_path, VALID.replace("a tiny set", "a \x07tiny set"), 3, "malformed YAML", "U+0007")


@pytest.mark.parametrize("empty", ["prompts: []", "prompts:"])
def test_empty_prompt_list(tmp_path, empty):
    text = VALID.split("prompts:")[0] + empty + "\n"
    expect_error(tmp_path, text, 8, "prompt list is empty")


def test_empty_file(tmp_path):
    expect_error(tmp_path, "# nothing here\n", 1, "empty")


def test_non_text_values_ask_for_quotes(tmp_path):
    expect_error(tmp_path, VALID.replace("id: activity-guitar", "id: 42"), 12, "must be text", "quotes")
    expect_error(tmp_path, VALID.replace('version: "1"', "version: 1.10"), 2, "version", "quotes")


def test_whole_number_version_is_kept_as_written(tmp_path):
    assert load_prompt_set(write(tmp_path, VALID.replace('version: "1"', "version: 2"))).version == "2"


def test_template_with_surrounding_whitespace(tmp_path):
    # A folded YAML string ("template: >") ends in a newline.
    text = VALID.replace('    template: "{} as a chef"\n', "    template: >\n      {} as a chef\n")
    expect_error(tmp_path, text, 11, "whitespace")


def test_class_phrase_must_not_contain_the_placeholder(tmp_path):
    expect_error(tmp_path, VALID.replace("class_phrase: a person", 'class_phrase: "a {}"'), 4, "class phrase")


def test_errors_are_user_facing():
    assert issubclass(PromptSetError, F2DBenchError)


@pytest.mark.parametrize("old, new, line, fragment", [
    # a key that is not text, and a top-level key given twice (PyYAML would keep the last silently)
    ("    category: job\n", "    category: job\n    1: x\n", 11, "has a key that is a number, not a field name"),
    ("name: tiny\n", "name: tiny\nname: other\n", 2, "the field 'name' twice (first on line 1)"),
    # several missing fields in one message, on the line of the mapping that lacks them
    ("    category: activity\n    template: \"{} playing the guitar\"\n", "", 12,
     "prompt #2 (id 'activity-guitar') is missing the fields category, template; add them"),
    # a misspelt key is reported before the field it leaves missing
    ("    category: activity\n", "    categry: activity\n", 13, "unknown field 'categry'"),
    # wrong YAML types, named by their tag; an empty value names the key's line
    ("category: job", "category: 1", 10, "prompt 'job-chef': category must be text, found a number"),
    ("version: \"1\"", "version: yes", 2, "found a yes/no value 'yes'"),
    ("    template: \"{} as a chef\"\n", "    template:\n", 11, "prompt 'job-chef': template has no value"),
    ("prompts:\n  - id: job-chef", "prompts:\n  - 3\n  - id: job-chef", 9, "prompt #1 must be a mapping"),
])
def test_schema_errors_name_the_line(tmp_path, old, new, line, fragment):
    text = VALID.replace(old, new, 1)
    assert text != VALID
    expect_error(tmp_path, text, line, fragment)


def test_whole_number_version_keeps_leading_zeros(tmp_path):
    assert load_prompt_set(write(tmp_path, VALID.replace('version: "1"', "version: 01"))).version == "01"


# --- the dataclasses ---------------------------------------------------------------------------------


def test_render_does_not_interpret_braces_or_format_fields():
    prompt = Prompt("job-x", "job", "{} wearing a {hat} and {0}")
    subject = "{name} {} {0!r} %s %(x)d {{}}"
    assert prompt.render(subject) == "{name} {} {0!r} %s %(x)d {{}} wearing a {hat} and {0}"
    assert prompt.render("f l") == "f l wearing a {hat} and {0}"
    # Substitution happens once: a subject holding the placeholder is not expanded again.
    assert Prompt("job-y", "job", "{} as a chef").render("{}") == "{} as a chef"


def test_prompt_constructor_checks_the_placeholder_id_and_category():
    with pytest.raises(PromptSetError, match="2 subject placeholders"):
        Prompt("job-x", "job", "{} and {}")
    with pytest.raises(PromptSetError, match="no subject placeholder"):
        Prompt("job-x", "job", "a chef")
    with pytest.raises(PromptSetError, match="invalid id"):
        Prompt("Job", "job", "{} as a chef")
    with pytest.raises(PromptSetError, match="unknown category"):
        Prompt("job-x", "sport", "{} as a chef")


def test_prompt_set_constructor_rejects_duplicates_and_the_reference_id():
    reference = Prompt("ref", "reference", "a photo of {}")
    chef = Prompt("job-chef", "job", "{} as a chef")
    with pytest.raises(PromptSetError, match="duplicate"):
        PromptSet("s", "1", (chef, chef), reference, "a person", Path("s.yaml"))
    with pytest.raises(PromptSetError, match="reference prompt's id"):
        PromptSet("s", "1", (Prompt("ref", "job", "{} x"),), reference, "a person", Path("s.yaml"))
    with pytest.raises(PromptSetError, match="no prompts"):
        PromptSet("s", "1", (), reference, "a person", Path("s.yaml"))


# --- content hash ------------------------------------------------------------------------------------


def _tiny_set(**changes) -> PromptSet:
    fields = dict(
        name="tiny",
        version="1",
        prompts=(
            Prompt("job-chef", "job", "{} as a chef"),
            Prompt("expression-laughing", "expression", "{} laughing"),
        ),
        reference=Prompt("ref", "reference", "a photo of {}"),
        class_phrase="a person",
        source=Path("tiny.yaml"),
    )
    fields.update(changes)
    return PromptSet(**fields)


def test_content_hash_is_pinned():
    # Run metadata keeps this hash: a change to the canonical form must be deliberate (bump _HASH_FORMAT
    # and this value together), never a side effect of a refactor.
    assert _tiny_set().content_hash() == "9c313b64c08dfecc"


def test_content_hash_is_stable_across_loads_and_layout(tmp_path):
    first = load_prompt_set("human40").content_hash()
    assert first == load_prompt_set("human40").content_hash()
    assert len(first) == 16 and int(first, 16) >= 0
    # Comments, key order, file name, name, version and description are not content.
    original = load_prompt_set(write(tmp_path, VALID, "a.yaml"))
    relaid = "# a comment\n" + VALID.replace("name: tiny", "name: other")
    relaid = relaid.replace('version: "1"', 'version: "7"')
    relaid = relaid.replace("    category: job\n    template: \"{} as a chef\"\n",
                            "    template: \"{} as a chef\"   # moved\n    category: job\n")
    assert relaid.count("# moved") == 1
    moved = load_prompt_set(write(tmp_path, relaid, "b.yaml"))
    assert moved.name == "other" and moved.source != original.source
    assert moved.content_hash() == original.content_hash()


def test_content_hash_changes_when_a_prompt_changes():
    base = _tiny_set()
    chef, laughing = base.prompts
    changed = [
        replace(base, prompts=(replace(chef, template="{} as a cook"), laughing)),
        replace(base, prompts=(replace(chef, id="job-cook"), laughing)),
        replace(base, prompts=(replace(chef, category="activity"), laughing)),
        replace(base, prompts=(laughing, chef)),
        replace(base, prompts=(chef,)),
        replace(base, reference=Prompt("ref", "reference", "a portrait of {}")),
        replace(base, class_phrase="a man"),
    ]
    hashes = {base.content_hash()} | {other.content_hash() for other in changed}
    assert len(hashes) == len(changed) + 1
