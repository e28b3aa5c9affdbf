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

The loader validates the file against a pydantic schema and names the file and line of every error (a
:class:`PromptSetError`): it composes the YAML nodes once (``yaml.compose``) and maps each error's key path
to the line of its node.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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
    return _parse(path, text)


# --- the file's schema -------------------------------------------------------------------------------


def _rule(problem: Callable[[Any], str | None]) -> AfterValidator:
    """A pydantic validator: ``problem(value)`` says what is wrong with the value, None if nothing."""

    def check(value: Any) -> Any:
        if (message := problem(value)) is not None:
            raise ValueError(message)
        return value

    return AfterValidator(check)


_Id = Annotated[str, _rule(_id_problem)]
_Template = Annotated[str, _rule(_template_problem)]


class _Schema(BaseModel):
    # strict: a number or a yes/no value is never taken for text
    model_config = ConfigDict(extra="forbid", strict=True)


class _ReferenceEntry(_Schema):
    id: _Id
    template: _Template


class _PromptEntry(_Schema):
    id: _Id
    category: Literal[CATEGORIES]  # _explain words the message ('reference' is reserved)
    template: _Template


class _PromptSetFile(_Schema):
    """A prompt-set file. The order of the fields is the order in which messages list them."""

    name: Annotated[str, _rule(lambda v: None if v.strip() else "the name is empty; name the set, e.g. after its file")]
    version: Annotated[str, Field(pattern=r"\S")]  # not blank; _explain words the message
    description: str = ""
    class_phrase: Annotated[str, _rule(_class_phrase_problem)]
    reference: _ReferenceEntry
    prompts: Annotated[list[_PromptEntry], Field(min_length=1)]


def _fields(loc: tuple) -> str:
    """The fields of the schema mapping at ``loc``, as text; "" inside a value, where no schema applies."""
    if len(loc) == 2 and loc[0] == "prompts" and isinstance(loc[1], int):
        return ", ".join(_PromptEntry.model_fields)
    schema = {(): _PromptSetFile, ("reference",): _ReferenceEntry}.get(loc)
    return ", ".join(schema.model_fields) if schema else ""


# --- loading: the YAML nodes give the lines, the schema the verdict ---------------------------------------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _describe(node: yaml.Node) -> str:
    return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")


def _compose(path: Path, text: str) -> yaml.Node | None:
    """The YAML node tree of the file (None if it holds no document); syntax errors name their line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = ": ".join(filter(None, (exc.context, exc.problem or "invalid YAML")))
        column = f" (column {mark.column + 1})" if mark is not None else ""
        hint = "Fix the YAML syntax there"
        if line is not None and "{" in "".join(text.splitlines()[line - 1 : line]):
            # The usual cause: an unquoted template, where "{" opens a YAML flow mapping.
            hint += '; quote every template, e.g. template: "{} laughing", because an unquoted { starts a YAML mapping'
        raise PromptSetError(f"malformed YAML: {problem}{column}. {hint}", path=path, line=line) from None
    except yaml.YAMLError as exc:
        # ReaderError (e.g. a control character) carries a character position, not a mark.
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        character = getattr(exc, "character", None)  # a code point (int) for text input
        what = f"the character U+{character:04X}" if isinstance(character, int) else "a character"
        raise PromptSetError(f"malformed YAML: {what} that YAML does not allow; remove it", path=path,
                             line=line) from None


class _Document:
    """A composed file: ``data`` for pydantic, ``nodes`` (key node, value node) by key path for the lines of
    its errors' ``loc``, and ``twice``: the keys given twice in a mapping, which pydantic never sees."""

    def __init__(self, root: yaml.Node) -> None:
        self.nodes: dict[tuple, tuple[yaml.Node | None, yaml.Node]] = {}
        self.twice: list[tuple[tuple, int, int]] = []  # (loc, first line, line)
        self.data = self._plain(root, None, ())

    def _plain(self, node: yaml.Node, key_node: yaml.Node | None, loc: tuple) -> Any:
        self.nodes[loc] = (key_node, node)  # a later duplicate key replaces the earlier, as in PyYAML
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(item, None, (*loc, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            data: dict[Any, Any] = {}
            for key, value in node.value:
                # A key that is not text stays a node: pydantic rejects it and hands it back as the input.
                name = key.value if key.tag == _STR_TAG else key
                if name in data and _fields(loc):
                    self.twice.append(((*loc, name), _line(self.nodes[(*loc, name)][0]), _line(key)))
                data[name] = self._plain(value, key, (*loc, name))
            return data
        if node.tag == _STR_TAG or (loc == ("version",) and node.tag == _INT_TAG):
            return node.value  # a whole-number version as written: 01 stays 01
        # Numbers, yes/no values, other tags stay nodes: no str to pydantic, and described by their tag.
        return None if node.tag == _NULL_TAG else node

    def line(self, loc: tuple) -> int:
        """The value's line; the key's for an empty value (its mark may sit on the next line); for a missing
        field, the line of the mapping that lacks it."""
        while loc not in self.nodes:
            loc = loc[:-1]
        key_node, node = self.nodes[loc]
        return _line(key_node) if key_node is not None and node.tag == _NULL_TAG else _line(node)

    def owner(self, loc: tuple, field: object = None) -> str:
        """How messages name the mapping at ``loc``; a prompt by its id once that id is valid."""
        if not loc or loc[0] == "reference":
            return "the reference prompt" if loc else "the prompt set"
        id_node = self.nodes.get((*loc[:2], "id"), (None, None))[1]
        prompt_id = id_node.value if id_node is not None and id_node.tag == _STR_TAG else None
        if field in ("category", "template") and prompt_id is not None and _id_problem(prompt_id) is None:
            return f"prompt {prompt_id!r}"
        return f"prompt #{loc[1] + 1}" + (f" (id {prompt_id!r})" if prompt_id is not None else "")


def _explain(doc: _Document, error: Any, errors: list[Any]) -> tuple[int, str]:
    """The line and message of one pydantic error."""
    loc, kind = error["loc"], error["type"]
    field, parent = (loc[-1], loc[:-1]) if loc else (None, ())
    node, line = doc.nodes.get(loc, (None, None))[1], doc.line(loc)
    if kind == "invalid_key":  # the input is the key's node (see _Document._plain)
        return (_line(error["input"]), f"{doc.owner(parent)} has a key that is {_describe(error['input'])}, not "
                f"a field name; allowed fields: {_fields(parent)}")
    if kind == "extra_forbidden":
        return (_line(doc.nodes[loc][0]), f"{doc.owner(parent)} has an unknown field {field!r}; allowed fields: "
                f"{_fields(parent)} (check the spelling)")
    if kind == "missing":
        missing = [e["loc"][-1] for e in errors if e["type"] == "missing" and e["loc"][:-1] == parent]
        many = len(missing) > 1
        return line, (f"{doc.owner(parent)} is missing the field{'s' if many else ''} {', '.join(missing)}; "
                      f"add {'them' if many else 'it'}")
    if loc == ("reference",) and node.tag == _NULL_TAG:
        return line, 'the reference prompt is empty; give it an id and a template, e.g. id: ref, template: "a photo of {}"'
    if kind == "model_type":
        return line, f"{doc.owner(loc)} must be a mapping with the fields {_fields(loc)}; found {_describe(node)}"
    if loc == ("version",):  # a float would turn "1.10" into 1.1: ask for text instead
        text = node.value if isinstance(node, yaml.ScalarNode) else ""
        return line, (f"version must be text or a whole number, found {_describe(node)} {text!r}; write it in "
                      'quotes, e.g. version: "1.0"')
    if loc == ("prompts",):
        if node.tag == _NULL_TAG or isinstance(node, yaml.SequenceNode):
            return line, "the prompt list is empty; add at least one prompt with id, category and template"
        return line, f"prompts must be a list of prompts (lines starting with '- '), found {_describe(node)}"
    owner = f"{doc.owner(parent, field)}: " if parent else ""
    if kind == "value_error":  # a _rule's message
        return line, owner + str(error["ctx"]["error"])
    if kind == "literal_error" and isinstance(error["input"], str):  # a category
        reserved = " ('reference' is kept for the reference prompt)" if error["input"] == REFERENCE_CATEGORY else ""
        return line, f"{owner}unknown category {error['input']!r}{reserved}; use one of {', '.join(CATEGORIES)}"
    if field == "template" and node.tag == "tag:yaml.org,2002:map" and not node.value:
        # template: {} laughing fails to parse, but template: {} composes to an empty mapping.
        return line, (f"{owner}the template is an empty mapping; an unquoted {{}} is YAML for a mapping, so quote "
                      'the template, e.g. template: "{} laughing"')
    if node.tag == _NULL_TAG:
        return line, f"{owner}{field} has no value; write it after the colon"
    return line, f"{owner}{field} must be text, found {_describe(node)}; write it in quotes"


#: Which errors are reported first: wrong keys, then missing fields, then wrong values (2).
_GROUP = {"invalid_key": 0, "extra_forbidden": 0, "missing": 1}


def _parse(path: Path, text: str) -> PromptSet:
    """The prompt set in ``text``; else PromptSetError for the first problem: wrong keys (unknown, given
    twice, not text), then missing fields, then wrong values, each group in file order."""
    root = _compose(path, text)
    if root is None:
        required = ", ".join(name for name, info in _PromptSetFile.model_fields.items() if info.is_required())
        raise PromptSetError(f"the file is empty; a prompt set needs the fields {required}", path=path, line=1)
    doc = _Document(root)
    problems = [(0, line, f"{doc.owner(loc[:-1])} has the field {loc[-1]!r} twice (first on line {first}); "
                 "keep one") for loc, first, line in doc.twice]
    try:
        data = _PromptSetFile.model_validate(doc.data)
    except ValidationError as exc:
        errors = exc.errors()
        problems += [(_GROUP.get(error["type"], 2), *_explain(doc, error, errors)) for error in errors]
    if problems:
        _, line, message = min(problems, key=lambda problem: problem[:2])
        raise PromptSetError(message, path=path, line=line)
    # Across entries, which the schema does not check: each id once, and none the reference prompt's.
    first_line = {data.reference.id: doc.line(("reference", "id"))}
    for index, entry in enumerate(data.prompts):
        line = doc.line(("prompts", index, "id"))
        if entry.id == data.reference.id:
            message = (f"prompt {entry.id!r}: the id is the reference prompt's id (line {first_line[entry.id]}); "
                       "choose another id")
        elif entry.id in first_line:
            message = (f"duplicate id {entry.id!r} (first used on line {first_line[entry.id]}); give each prompt "
                       "its own id")
        else:
            first_line[entry.id] = line
            continue
        raise PromptSetError(message, path=path, line=line)
    prompts = tuple(Prompt(entry.id, entry.category, entry.template) for entry in data.prompts)
    reference = Prompt(data.reference.id, REFERENCE_CATEGORY, data.reference.template)
    return PromptSet(data.name, data.version, prompts, reference, data.class_phrase, path, data.description)
