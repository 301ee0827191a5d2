"""The experiment record: every setting that decides an edit's pixels, in one frozen dataclass.

Built from the `p2p edit` flags (cli.py) or from JSON (the manifests of scripts/, a result's
own metadata for `--recipe`), written whole into every output's metadata, and run by
`p2p.run.run(model, record)`. Field names are the flags' names. In JSON a window is F or
[START, END] (or "START:END"), word lists are lists (or "a,b" strings), offsets are
[L, R, T, B] (or "L,R,T,B"). Standard library only, so the command line stays instant.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from models import InputError

MAX_SEED = 2 ** 64 - 1                     # torch.Generator.manual_seed's range
FLOAT32_MAX = 3.4028234663852886e38         # a scale past it overflows the float32 tensor it goes into
MODES = ("replace", "refine", "reweight")
SAMPLERS = ("ddim", "plms")                # p2p/sampler.py's
MAPPERS = ("aligned", "official")          # p2p/align.py's replace mappers
METHODS = ("null-text", "negative-prompt", "ddim", "direct")   # p2p/inversion.py's

Window = float | tuple[float, float]


@dataclass(frozen=True)
class Experiment:
    """One Prompt-to-Prompt run (the CLI's defaults; see `p2p edit --help` for each field)."""
    source: str
    targets: tuple[str, ...]
    mode: str                                   # replace | refine | reweight
    cross_steps: Window = 0.8                   # fraction or (start, end) of the steps
    word_steps: dict = field(default_factory=dict)   # {word: window} for single target words
    self_steps: Window = 0.4
    self_max_tokens: int = 256
    blend: tuple[tuple[str, ...], ...] = ()     # local blend words, one tuple per prompt
    blend_threshold: float = 0.3
    blend_res: int = 16
    blend_start: float = 0.0
    blend_subtract: tuple[tuple[str, ...], ...] = ()
    blend_mask: str | None = None               # a drawn edit region (image file) instead of blend words
    reweight: dict = field(default_factory=dict)     # {word: scale}
    replace_mapper: str = "aligned"
    sampler: str = "ddim"
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    image: str | None = None                    # a photo to edit instead of sampling from the seed
    inversion: str | None = None                # its inversion file (default: invert, cached)
    method: str = "null-text"
    inner_steps: int = 10
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0)
    cross_sites: tuple[tuple[str, int | str], ...] = ()   # (place, side) layers of the cross edit; () all
    self_sites: tuple[tuple[str, int | str], ...] = ()    # ... of the self-attention injection

    @property
    def prompts(self) -> list[str]:
        return [self.source, *self.targets]

    def to_json(self) -> dict:
        """Plain JSON values, every field (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes) -> "Experiment":
        """A copy with some fields changed, checked like a new record."""
        return from_json({**self.to_json(), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(Experiment)}
REQUIRED = tuple(name for name, f in FIELDS.items()
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


# ---- checking values: each returns the canonical value or raises ValueError(why) ------------

def number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not isinstance(value, str):
            raise ValueError(f"not a number: {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"not a number: {value!r}") from None
    try:
        value = float(value)
    except OverflowError:   # an int past float's range (JSON has no limit on them)
        raise ValueError(f"must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


def integer(value, low: int, high: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not an integer: {value!r}")
    try:
        value = int(value)
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None
    if not low <= value <= high:
        raise ValueError(f"must be at least {low}, got {value}" if high == math.inf else
                         f"must lie in {low}..{'2**64-1' if high == MAX_SEED else high}, got {value}")
    return value


def fraction(value) -> float:
    value = number(value)
    if not 0 <= value <= 1:
        raise ValueError(f"a fraction of the steps lies in [0, 1], got {value}")
    return value


def unit(value) -> float:
    value = number(value)
    if not 0 <= value <= 1:
        raise ValueError(f"must lie in [0, 1], got {value}")
    return value


def scale(value) -> float:
    value = number(value)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"must lie within +-3.4e38 (float32's range), got {value}")
    return value


def window(value) -> Window:
    """F (the first F of the steps) or (START, END), fractions with START <= END."""
    if isinstance(value, str) and ":" in value:
        value = value.split(":")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"a step window is F or [START, END], got {value!r}")
        start, end = fraction(value[0]), fraction(value[1])
        if start > end:
            raise ValueError(f"step window {start}:{end} ends before it starts")
        return start, end
    return fraction(value)


def text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def texts(value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"a non-empty list of strings, got {value!r}")
    return tuple(text(v) for v in value)


def word_lists(value) -> tuple[tuple[str, ...], ...]:
    """One word list per prompt: [["cat"], ["dog"]] or ["cat", "dog"] or ["a,b", "c"]."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"one word list per prompt, got {value!r}")
    return tuple(tuple(w for w in v.split(",") if w) if isinstance(v, str) else texts(v) for v in value)


def mapping(value, of) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"a {{word: value}} object, got {value!r}")
    return {text(k): of(v) for k, v in value.items()}


def choice(options):
    def check(value):
        if value not in options:
            raise ValueError(f"one of {', '.join(options)}, got {value!r}")
        return value
    return check


def optional(of):
    return lambda value: None if value is None else of(value)


def offsets(value) -> tuple[int, int, int, int]:
    """Pixels cropped off the photo's left, right, top and bottom, as the official load_512 takes them."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        values = tuple(integer(v, 0) for v in parts)
    except (ValueError, TypeError):
        values = ()
    if len(values) != 4:
        raise ValueError(f"LEFT,RIGHT,TOP,BOTTOM pixel counts >= 0, got {value!r}")
    return values


PLACES = ("down", "mid", "up", "any")


def sites(value) -> tuple[tuple[str, int | str], ...]:
    """Layers as PLACE:SIDE items: "down:16,up:16", ["up:16"] or [["up", 16]]; PLACE down, mid, up
    or any, SIDE the short side of the layer's feature map or any. PLACE@LEVEL ("up@1", kept as
    ("up", "@1")) picks by resolution level instead, the same at every image size. "" or [] is
    every layer."""
    items = [v for v in value.split(",") if v] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"PLACE:SIDE items, got {value!r}")
    out = []
    for given in items:
        item = given
        if isinstance(item, str) and "@" in item:
            place, level = item.split("@", 1)
            item = (place, "@" + level)
        place, side = item.split(":", 1) if isinstance(item, str) and ":" in item else \
            item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
        if place not in PLACES:
            raise ValueError(f"a site is PLACE:SIDE, PLACE one of {', '.join(PLACES)}, got {given!r}")
        try:
            side = side if side == "any" else "@" + str(integer(side[1:], 0)) \
                if isinstance(side, str) and side.startswith("@") else integer(side, 1)
        except (ValueError, TypeError):
            raise ValueError(f"a site is PLACE:SIDE (SIDE a feature-map side, 16, or any) or PLACE@LEVEL, "
                             f"got {given!r}") from None
        out.append((place, side))
    return tuple(out)


def site_text(place: str, side) -> str:
    return f"{place}{side}" if isinstance(side, str) and side.startswith("@") else f"{place}:{side}"


CHECKS = {
    "source": text, "targets": texts, "mode": choice(MODES), "cross_steps": window,
    "word_steps": lambda v: mapping(v, window), "self_steps": window,
    "self_max_tokens": lambda v: integer(v, 0), "blend": word_lists, "blend_threshold": unit,
    "blend_res": lambda v: integer(v, 1), "blend_start": fraction, "blend_subtract": word_lists, "blend_mask": optional(text),
    "reweight": lambda v: mapping(v, scale), "replace_mapper": choice(MAPPERS), "sampler": choice(SAMPLERS),
    "seed": lambda v: integer(v, 0, MAX_SEED), "steps": lambda v: integer(v, 1, 1000), "guidance": number,
    "height": lambda v: integer(v, 8), "width": lambda v: integer(v, 8), "image": optional(text),
    "inversion": optional(text), "method": choice(METHODS), "inner_steps": lambda v: integer(v, 1),
    "offsets": offsets, "cross_sites": sites, "self_sites": sites,
}
assert CHECKS.keys() == FIELDS.keys()


PATHS = ("image", "blend_mask", "inversion")   # the fields that name files


def anchored(data: dict, folder) -> dict:
    """JSON record fields with their relative file paths taken from `folder` (a recipe's), all absolute."""
    return {k: os.path.abspath(os.path.join(folder, v)) if k in PATHS and isinstance(v, str) else v
            for k, v in data.items()}


def name(field: str, where: str | None) -> str:
    """How an error names a field: its path in JSON (`where.field`), or its flag (where None)."""
    if where is None:
        return "--target" if field == "targets" else f"--{field.replace('_', '-')}"
    return f"{where}.{field}"


def from_json(data: dict, where: str | None = "record") -> Experiment:
    """A record from JSON values; the first bad entry is one InputError naming its path, e.g.
    "spec.cases[2].cross_steps: a fraction of the steps lies in [0, 1], got 1.5" (or its flag,
    with `where` None: the command line builds records through here too)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: an experiment record is a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise InputError(f"{where or 'flags'}: unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"{name(missing[0], where)} is " + ("required (or give --recipe)" if where is None
                                                              else "missing"))
    values = {}
    for field_name, value in data.items():
        try:
            values[field_name] = CHECKS[field_name](value)
        except ValueError as e:
            raise InputError(f"{name(field_name, where)}: {e}") from None
    record = Experiment(**values)
    check(record, where)
    return record


def check(record: Experiment, where: str | None = "record"):
    """What one field cannot say alone: settings that only make sense together."""
    n = lambda field: name(field, where)
    if record.replace_mapper != "aligned" and record.mode != "replace":
        raise InputError(f"{n('replace_mapper')} is the word swap's; {n('mode')} {record.mode} has no replace mapper")
    if record.blend and record.blend_mask:
        raise InputError(f"{n('blend')} words or {n('blend_mask')}: a local blend takes its region from one")
    if record.blend_subtract and not record.blend:
        raise InputError(f"{n('blend_subtract')} cuts words out of a local blend: give {n('blend')} WORDS too")
    if record.blend_start and not (record.blend or record.blend_mask):
        raise InputError(f"{n('blend_start')} shapes a local blend: give {n('blend')} WORDS (or {n('blend_mask')}) "
                         "too")
    if record.mode == "reweight" and not record.reweight:
        raise InputError(f"{n('mode')} reweight needs at least one {n('reweight')} WORD=SCALE")
    if record.inversion is not None and record.image is None:
        raise InputError(f"{n('inversion')} needs the {n('image')} it was made from")
    if record.image is not None and record.sampler != "ddim":
        raise InputError(f"{n('sampler')} {record.sampler} cannot edit a photo: its inversion walks DDIM's "
                         f"steps backwards, so the edit must sample them forwards with {n('sampler')} ddim")


def command_line(record: Experiment) -> list[str]:
    """The `p2p edit` flags that give this record (defaults left out), for showing how a result
    was made; parsing them gives the record back."""
    defaults, out = Experiment(record.source, record.targets, record.mode), []
    for field_name in FIELDS:
        value = getattr(record, field_name)
        if field_name in REQUIRED or value != getattr(defaults, field_name):
            flag = name(field_name, None)
            if field_name == "targets":
                out += [a for t in value for a in (flag, t)]
            elif field_name in ("word_steps", "reweight"):
                out += [flag, *(f"{w}={window_text(v)}" for w, v in value.items())]
            elif field_name in ("blend", "blend_subtract"):
                out += [flag, *(",".join(words) for words in value)]
            elif field_name == "offsets":
                out += [flag, ",".join(map(str, value))]
            elif field_name.endswith("_sites"):
                out += [flag, ",".join(site_text(p, s) for p, s in value)]
            else:
                out += [flag, window_text(value) if field_name.endswith("_steps") else str(value)]
    return out


def window_text(value) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)
