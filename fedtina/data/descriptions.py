"""Natural-language descriptions of classes, as an alternative text prompt to the class name.

    load_descriptions("generated", ds)    # the embedded dataset: one sentence per class from its three words
    load_descriptions("birds.tsv", ds)    # any dataset: "name<TAB>sentence" lines ('#' comments, blank lines ok)

A description reads the way a user who does not know the class's name would put it, e.g. "red striped triangle" ->
"a shape with three corners, coloured red, covered in stripes": the shape and texture words are paraphrased, so a
Tina trained on names must map new wording to the same head. Classes a file leaves out keep their names.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtina.errors import FedtinaError

GENERATED = "generated"

# paraphrases that share no word with the class name (colours are kept: there is no other word for "red")
_SHAPE = {
    "circle": "a round disc", "square": "a box with four equal sides", "triangle": "a shape with three corners",
    "star": "a shape with five points", "cross": "a plus sign", "ring": "a round band with a hole in the middle",
    "heart": "the symbol of love", "crescent": "a thin curve like a new moon",
    "arrow": "a pointer with a head and a shaft",
}
_TEXTURE = {"solid": "filled with one flat colour", "striped": "covered in stripes", "dotted": "covered in spots",
            "checkered": "with a chessboard pattern"}


def shapes_sentence(name: str) -> str:
    """ "red striped triangle" -> "a shape with three corners, coloured red, covered in stripes"."""
    parts = name.split()
    if len(parts) != 3 or parts[1] not in _TEXTURE or parts[2] not in _SHAPE:
        raise FedtinaError(f"descriptions=generated: {name!r} is not a 'colour texture shape' class of the "
                           f"embedded dataset")
    colour, texture, shape = parts
    return f"{_SHAPE[shape]}, coloured {colour}, {_TEXTURE[texture]}"


def parse_descriptions(text: str, class_names: list[str], where: str) -> dict[str, str]:
    """`name<TAB>sentence` lines -> {name: sentence}; FedtinaError naming the line for a malformed line, an unknown
    class or a class described twice."""
    known, out = set(class_names), {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, tab, sentence = line.partition("\t")
        name, sentence = name.strip(), re.sub(r"\s+", " ", sentence).strip()
        if not tab or not name or not sentence:
            raise FedtinaError(f"{where} line {no}: expected 'class name<TAB>description', got {line[:80]!r}")
        if name not in known:
            raise FedtinaError(f"{where} line {no}: unknown class {name!r} (the dataset has {len(class_names)} "
                               f"classes, e.g. {', '.join(class_names[:3])})")
        if name in out:
            raise FedtinaError(f"{where} line {no}: class {name!r} is described twice")
        out[name] = sentence
    if not out:
        raise FedtinaError(f"{where}: no descriptions in it")
    return out


def load_descriptions(source: str | None, class_names: list[str]) -> dict[str, str]:
    """{class name: description} from `source` ("generated", a file path, or None: no descriptions)."""
    if not source:
        return {}
    if source == GENERATED:
        return {n: shapes_sentence(n) for n in class_names}
    path = Path(source).expanduser()
    if not path.is_file():
        raise FedtinaError(f"descriptions file {path} does not exist (expected 'name<TAB>sentence' lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FedtinaError(f"descriptions file {path} is not UTF-8 text ({err})") from err
    return parse_descriptions(text, class_names, str(path))


def as_text_prompt(sentence: str) -> str:
    """What the text encoder embeds for a description: the template reads "a photo of a {}.", so a leading
    article is dropped ("a shape with three corners" -> "a photo of a shape with three corners.")."""
    return re.sub(r"^(?:an?|the)\s+", "", sentence.strip(), flags=re.IGNORECASE)
