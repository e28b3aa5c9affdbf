"""Prompt sets: the text prompts of the evaluation grid, kept as YAML data files.

A prompt set file (``prompts/human40.yaml`` is the paper-sized one) looks like::

    name: human40
    version: "1"
    description: 40 human-centric prompts ...
    class_phrase: a person
    reference:
      id: ref
      template: "a photo of {}"
    prompts:
      - id: job-chef
        category: job
        template: "{} as a chef in a restaurant kitchen"

Every template holds exactly one subject placeholder ``{}`` standing for S*: a method replaces it with its
own subject text, and CLIP text and the plain-SD reference method replace it with ``class_phrase``. The
reference prompt is rendered once per (face, seed) and gives dCLIP its reference image; rendered with the
class phrase it is dCLIP's reference text "a photo of a person" (PROTOCOL.md section 2).

The loader walks the composed YAML nodes (``yaml.compose``) rather than the constructed Python objects, so
that every error can name the file and line at fault; each is a :class:`PromptSetError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from f2d_bench.errors import F2DBenchError

#: The subject placeholder in templates; it stands for S*.
PLACEHOLDER = "{}"
#: The categories of the paper's prompts (§4.2), in the order reports list them.
CATEGORIES = ("job", "activity", "expression", "location")
#: The category of a set's reference prompt; not allowed for ordinary prompts.
REFERENCE_CATEGORY = "reference"
#: Prompt ids: ``^[a-z0-9][a-z0-9-]*$``. Used with fullmatch, because ``$`` would also accept a trailing
#: newline. Ids become directory names of a run, hence the small alphabet.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
#: Built-in prompt sets: ``<repository root>/prompts/NAME.yaml``.
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

# Version of the canonical form hashed by PromptSet.content_hash; bump it only if that form must change.
_HASH_FORMAT = 1

_TOP_FIELDS = ("name", "version", "description", "class_phrase", "reference", "prompts")
_TOP_REQUIRED = ("name", "version", "class_phrase", "reference", "prompts")
_PROMPT_FIELDS = ("id", "category", "template")
_REFERENCE_FIELDS = ("id", "template")

_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_NULL_TAG = "tag:yaml.org,2002:null"
_TAG_NAMES = {
    _STR_TAG: "text",
    _INT_TAG: "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a yes/no value",
    _NULL_TAG: "empty",
    "tag:yaml.org,2002:map": "a mapping",
    "tag:yaml.org,2002:seq": "a list",
}


class PromptSetError(F2DBenchError):
    """A prompt set cannot be found or is invalid.

    The message starts with ``FILE:LINE:`` where both are known and says what to change.
    ``path`` and ``line`` (1-based) are also kept as attributes, ``None`` where unknown.
    """

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.detail = message
        if path is not None and line is not None:
            message = f"{path}:{line}: {message}"
        elif path is not None:
            message = f"{path}: {message}"
        super().__init__(message)


# --- rules shared by the dataclasses and the loader, so both give the same verdict ------------------


def _id_problem(prompt_id: object) -> str | None:
    if not isinstance(prompt_id, str) or not ID_PATTERN.fullmatch(prompt_id):
        return (
            f"invalid id {prompt_id!r}: use lowercase letters, digits and hyphens, starting with a "
            "letter or digit (e.g. job-chef)"
        )
    return None


def _template_problem(template: object) -> str | None:
    if not isinstance(template, str):
        return f"the template must be text, not {type(template).__name__}"
    count = template.count(PLACEHOLDER)
    if count != 1:
        found = "no subject placeholder {}" if count == 0 else f"{count} subject placeholders {{}}"
        hint = ""
        if "{" in template.replace(PLACEHOLDER, ""):
            # e.g. "{subject}" or "{0}": str.format habits, which are not the placeholder here.
            hint = " (only the two characters {} are the placeholder; {name} or {0} are not)"
        return f"the template {template!r} has {found}; write exactly one {{}} where the subject goes{hint}"
    if template != template.strip():
        # Typically a folded YAML string (template: >) that brought a trailing newline.
        return f"the template {template!r} starts or ends with whitespace; remove it"
    return None


def _class_phrase_problem(phrase: object) -> str | None:
    if not isinstance(phrase, str) or not phrase.strip():
        return "the class phrase must be non-empty text, e.g. 'a person'"
    if PLACEHOLDER in phrase:
        return f"the class phrase {phrase!r} contains the placeholder {{}}; it is the text that replaces {{}}"
    if phrase != phrase.strip():
        return f"the class phrase {phrase!r} starts or ends with whitespace; remove it"
    return None


# --- the data model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt template with exactly one subject placeholder ``{}``."""

    id: str
    category: str
    template: str

    def __post_init__(self) -> None:
        problem = _id_problem(self.id) or _template_problem(self.template)
        if problem is None and self.category not in CATEGORIES + (REFERENCE_CATEGORY,):
            problem = f"unknown category {self.category!r}; use one of {', '.join(CATEGORIES)}"
        if problem is not None:
            raise PromptSetError(f"prompt {self.id!r}: {problem}")

    def render(self, subject: str) -> str:
        """The prompt with the placeholder replaced by ``subject``.

        Plain string replacement, never ``str.format``: other braces in the template stay literal, and
        the subject's text is inserted as is (braces, ``%s`` and all), never interpreted.
        """
        if not isinstance(subject, str):
            raise TypeError(f"subject must be a str, not {type(subject).__name__}")
        # The template has exactly one placeholder (checked at construction) and the inserted subject
        # is never scanned again, so a "{}" inside the subject stays as it is.
        return self.template.replace(PLACEHOLDER, subject, 1)


@dataclass(frozen=True)
class PromptSet:
    """A named, versioned set of prompts plus the reference prompt and the class phrase.

    ``prompts`` excludes the reference prompt; :meth:`all_prompts` appends it.
    """

    name: str
    version: str
    prompts: tuple[Prompt, ...]
    reference: Prompt
    class_phrase: str
    source: Path
    description: str = ""

    def __post_init__(self) -> None:
        # A list would make the frozen set mutable after all; accept any sequence, keep a tuple.
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "source", Path(self.source))
        where = f"prompt set {self.name!r}"
        if not self.prompts:
            raise PromptSetError(f"{where} has no prompts")
        if self.reference.category != REFERENCE_CATEGORY:
            raise PromptSetError(f"{where}: the reference prompt's category must be {REFERENCE_CATEGORY!r}")
        seen: set[str] = set()
        for prompt in self.prompts:
            if prompt.category == REFERENCE_CATEGORY:
                raise PromptSetError(f"{where}: prompt {prompt.id!r} uses the reserved category 'reference'")
            if prompt.id in seen:
                raise PromptSetError(f"{where}: duplicate prompt id {prompt.id!r}")
            if prompt.id == self.reference.id:
                raise PromptSetError(f"{where}: prompt id {prompt.id!r} is the reference prompt's id")
            seen.add(prompt.id)
        problem = _class_phrase_problem(self.class_phrase)
        if problem is not None:
            raise PromptSetError(f"{where}: {problem}")

    def by_id(self, prompt_id: str) -> Prompt:
        """The prompt with this id; the reference prompt's id gives the reference prompt."""
        for prompt in self.all_prompts():
            if prompt.id == prompt_id:
                return prompt
        raise PromptSetError(
            f"prompt set {self.name!r} ({self.source}) has no prompt {prompt_id!r}; "
            f"its ids are: {', '.join(p.id for p in self.all_prompts())}"
        )

    def ids(self) -> tuple[str, ...]:
        """The ids of the prompts in file order, without the reference prompt."""
        return tuple(prompt.id for prompt in self.prompts)

    def categories(self) -> tuple[str, ...]:
        """The categories that occur in the set, in the order of :data:`CATEGORIES`."""
        present = {prompt.category for prompt in self.prompts}
        return tuple(category for category in CATEGORIES if category in present)

    def all_prompts(self) -> tuple[Prompt, ...]:
        """The prompts followed by the reference prompt (everything a generation run renders)."""
        return self.prompts + (self.reference,)

    def content_hash(self) -> str:
        """16 hex digits of the sha256 of what gets rendered, for run metadata.

        Covers the placeholder, the class phrase, the reference prompt and every prompt (id, category,
        template) in file order. Leaves out name, version, description and file location, which run
        metadata records beside it: a renamed or moved copy of the same prompts keeps its hash, and YAML
        comments or layout never change it.
        """
        canonical = {
            "format": _HASH_FORMAT,
            "placeholder": PLACEHOLDER,
            "class_phrase": self.class_phrase,
            "reference": [self.reference.id, self.reference.template],
            "prompts": [[p.id, p.category, p.template] for p in self.prompts],
        }
        data = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


# --- finding a prompt set ----------------------------------------------------------------------------


def available_prompt_sets() -> tuple[str, ...]:
    """The names of the built-in prompt sets (``prompts/*.yaml``), sorted."""
    return tuple(sorted(path.stem for path in PROMPTS_DIR.glob("*.yaml")))


def _looks_like_path(text: str) -> bool:
    separators = [sep for sep in ("/", os.sep, os.altsep) if sep]
    return text.lower().endswith((".yaml", ".yml")) or any(sep in text for sep in separators)


def resolve_prompt_set(name_or_path: str | Path) -> Path:
    """The file of a prompt set: a path to a YAML file, or a built-in name (``prompts/NAME.yaml``).

    A ``Path``, or a string ending in ``.yaml``/``.yml`` or holding a path separator, is a path;
    anything else is a built-in name.
    """
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise PromptSetError(
                f"prompt set file not found: {path}. Give the path of an existing .yaml file, or a built-in "
                f"prompt set: {', '.join(available_prompt_sets()) or '(none)'}"
            )
        return path
    path = PROMPTS_DIR / f"{name_or_path}.yaml"
    if not name_or_path or not path.is_file():
        available = ", ".join(available_prompt_sets()) or f"(none found in {PROMPTS_DIR})"
        raise PromptSetError(
            f"unknown prompt set {name_or_path!r}. Built-in prompt sets: {available}; "
            "or give the path of a prompt-set .yaml file"
        )
    return path


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """Load and validate a prompt set, by built-in name (e.g. ``"human40"``) or path to a YAML file."""
    path = resolve_prompt_set(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptSetError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8", path=path
        ) from exc
    except OSError as exc:
        raise PromptSetError(f"cannot read the file: {exc.strerror or exc}", path=path) from exc
    return _Parser(path, text).parse()


# --- parsing -----------------------------------------------------------------------------------------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _peek_id(entry: yaml.Node) -> str | None:
    """The id text of a prompt entry, if it has one, to name the entry in errors found before its id."""
    if isinstance(entry, yaml.MappingNode):
        for key_node, value_node in entry.value:
            if getattr(key_node, "value", None) == "id" and value_node.tag == _STR_TAG:
                return value_node.value
    return None


def _describe(node: yaml.Node) -> str:
    return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")


class _Parser:
    """Turns the composed YAML node tree of one file into a PromptSet; every error names file and line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def fail(self, line: int | None, message: str) -> NoReturn:
        raise PromptSetError(message, path=self.path, line=line)

    def parse(self) -> PromptSet:
        root = self.compose()
        if root is None:
            self.fail(1, "the file is empty; a prompt set needs the fields " + ", ".join(_TOP_REQUIRED))
        top = self.fields(root, "the prompt set", _TOP_FIELDS, _TOP_REQUIRED)

        # The reference first, wherever it sits in the file: the prompts' ids are checked against it.
        reference, reference_line = self.reference(*top["reference"])
        class_phrase = self.text_value(*top["class_phrase"], "class_phrase")
        problem = _class_phrase_problem(class_phrase)
        if problem is not None:
            self.fail(_line(top["class_phrase"][1]), problem)
        name = self.text_value(*top["name"], "name")
        if not name.strip():
            self.fail(_line(top["name"][1]), "the name is empty; name the set, e.g. after its file")
        version = self.version(*top["version"])
        description = ""
        if "description" in top:
            description = self.text_value(*top["description"], "description")
        prompts = self.prompt_list(*top["prompts"], reference, reference_line)
        return PromptSet(
            name=name,
            version=version,
            prompts=prompts,
            reference=reference,
            class_phrase=class_phrase,
            source=self.path,
            description=description,
        )

    def compose(self) -> yaml.Node | None:
        try:
            return yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = exc.problem or "invalid YAML"
            if exc.context:
                problem = f"{exc.context}: {problem}"
            column = f" (column {mark.column + 1})" if mark is not None else ""
            hint = "Fix the YAML syntax there"
            lines = self.text.splitlines()
            if line is not None and line <= len(lines) and "{" in lines[line - 1]:
                # The usual cause: an unquoted template, where "{" opens a YAML flow mapping.
                hint += (
                    '; quote every template, e.g. template: "{} laughing", '
                    "because an unquoted { starts a YAML mapping"
                )
            self.fail(line, f"malformed YAML: {problem}{column}. {hint}")
        except yaml.YAMLError as exc:
            # ReaderError (e.g. a control character) carries a character position, not a mark.
            position = getattr(exc, "position", None)
            line = self.text.count("\n", 0, position) + 1 if isinstance(position, int) else None
            character = getattr(exc, "character", None)  # a code point (int) for text input
            what = f"the character U+{character:04X}" if isinstance(character, int) else "a character"
            self.fail(line, f"malformed YAML: {what} that YAML does not allow; remove it")

    def fields(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The (key node, value node) of each field of a mapping, checking unknown, duplicate, missing."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                _line(node),
                f"{what} must be a mapping with the fields {', '.join(allowed)}; found {_describe(node)}",
            )
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                self.fail(_line(key_node), f"{what} has a key that is {_describe(key_node)}, not a field "
                          f"name; allowed fields: {', '.join(allowed)}")
            key = key_node.value
            if key in found:
                # PyYAML would silently keep the last one; two templates for one prompt are a mistake.
                self.fail(_line(key_node), f"{what} has the field {key!r} twice (first on line "
                          f"{_line(found[key][0])}); keep one")
            if key not in allowed:
                self.fail(_line(key_node), f"{what} has an unknown field {key!r}; allowed fields: "
                          f"{', '.join(allowed)} (check the spelling)")
            found[key] = (key_node, value_node)
        missing = [field for field in required if field not in found]
        if missing:
            self.fail(_line(node), f"{what} is missing the field{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(missing)}; add {'them' if len(missing) > 1 else 'it'}")
        return found

    def value_line(self, key_node: yaml.Node, value_node: yaml.Node) -> int:
        # An absent value ("template:") is an empty null scalar whose mark may sit on the next line.
        if value_node.tag == _NULL_TAG:
            return _line(key_node)
        return _line(value_node)

    def text_value(self, key_node: yaml.Node, value_node: yaml.Node, field: str) -> str:
        if value_node.tag == _NULL_TAG:
            self.fail(self.value_line(key_node, value_node),
                      f"{field} has no value; write it after the colon")
        if not isinstance(value_node, yaml.ScalarNode) or value_node.tag != _STR_TAG:
            self.fail(self.value_line(key_node, value_node),
                      f"{field} must be text, found {_describe(value_node)}; write it in quotes")
        return value_node.value

    def version(self, key_node: yaml.Node, value_node: yaml.Node) -> str:
        if isinstance(value_node, yaml.ScalarNode) and value_node.tag in (_STR_TAG, _INT_TAG):
            version = value_node.value  # the text as written: 01 stays 01
            if version.strip():
                return version
        # A float would turn "1.10" into 1.1; ask for text instead.
        self.fail(self.value_line(key_node, value_node),
                  f"version must be text or a whole number, found {_describe(value_node)} "
                  f"{value_node.value if isinstance(value_node, yaml.ScalarNode) else ''!r}; write it in "
                  'quotes, e.g. version: "1.0"')

    def template(self, key_node: yaml.Node, value_node: yaml.Node, owner: str) -> str:
        if value_node.tag == "tag:yaml.org,2002:map" and not value_node.value:
            # template: {} laughing fails to parse, but template: {} composes to an empty mapping.
            self.fail(_line(value_node), f"{owner}: the template is an empty mapping; an unquoted {{}} is "
                      'YAML for a mapping, so quote the template, e.g. template: "{} laughing"')
        template = self.text_value(key_node, value_node, f"{owner}: template")
        problem = _template_problem(template)
        if problem is not None:
            self.fail(_line(value_node), f"{owner}: {problem}")
        return template

    def prompt_id(self, key_node: yaml.Node, value_node: yaml.Node, owner: str) -> str:
        prompt_id = self.text_value(key_node, value_node, f"{owner}: id")
        problem = _id_problem(prompt_id)
        if problem is not None:
            self.fail(_line(value_node), f"{owner}: {problem}")
        return prompt_id

    def reference(self, key_node: yaml.Node, node: yaml.Node) -> tuple[Prompt, int]:
        what = "the reference prompt"
        if node.tag == _NULL_TAG:
            self.fail(_line(key_node), f"{what} is empty; give it an id and a template, e.g. id: ref, "
                      'template: "a photo of {}"')
        fields = self.fields(node, what, _REFERENCE_FIELDS, _REFERENCE_FIELDS)
        prompt_id = self.prompt_id(*fields["id"], what)
        template = self.template(*fields["template"], what)
        return Prompt(prompt_id, REFERENCE_CATEGORY, template), _line(fields["id"][1])

    def prompt_list(
        self, key_node: yaml.Node, node: yaml.Node, reference: Prompt, reference_line: int
    ) -> tuple[Prompt, ...]:
        if node.tag == _NULL_TAG or (isinstance(node, yaml.SequenceNode) and not node.value):
            self.fail(self.value_line(key_node, node), "the prompt list is empty; add at least one prompt "
                      "with id, category and template")
        if not isinstance(node, yaml.SequenceNode):
            self.fail(_line(node), f"prompts must be a list of prompts (lines starting with '- '), "
                      f"found {_describe(node)}")
        prompts: list[Prompt] = []
        first_line: dict[str, int] = {}
        for index, entry in enumerate(node.value, start=1):
            what = f"prompt #{index}"
            peeked = _peek_id(entry)
            if peeked is not None:
                what += f" (id {peeked!r})"
            fields = self.fields(entry, what, _PROMPT_FIELDS, _PROMPT_FIELDS)
            prompt_id = self.prompt_id(*fields["id"], what)
            what = f"prompt {prompt_id!r}"
            id_line = _line(fields["id"][1])
            if prompt_id == reference.id:
                self.fail(id_line, f"{what}: the id is the reference prompt's id (line {reference_line}); "
                          "choose another id")
            if prompt_id in first_line:
                self.fail(id_line, f"duplicate id {prompt_id!r} (first used on line "
                          f"{first_line[prompt_id]}); give each prompt its own id")
            first_line[prompt_id] = id_line
            category = self.text_value(*fields["category"], f"{what}: category")
            if category not in CATEGORIES:
                reserved = ""
                if category == REFERENCE_CATEGORY:
                    reserved = " ('reference' is kept for the reference prompt)"
                self.fail(_line(fields["category"][1]), f"{what}: unknown category {category!r}{reserved}; "
                          f"use one of {', '.join(CATEGORIES)}")
            template = self.template(*fields["template"], what)
            prompts.append(Prompt(prompt_id, category, template))
        return tuple(prompts)
