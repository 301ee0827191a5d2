"""The experiment record: every setting that decides an edit's pixels, in one frozen dataclass.

Each field carries its check and its help, so the `p2p edit` flags (cli.py), JSON (the manifests
of scripts/, sweep specs, a result's own metadata for `--recipe`) and Python all build records
through one validator, `from_json`. A record is written whole into every output's metadata and
run by p2p/experiment/run.py. Field names are the flags' names. In JSON a window is F or
[START, END] (or "START:END"), word lists are lists (or "a,b" strings), {word: value} objects
may be ["WORD=VALUE", ...] lists, offsets are [L, R, T, B] (or "L,R,T,B"). Fields left None
take the model's own defaults (its native size and what scales with it) in run.prepare.
Standard library only, so the command line stays instant.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from models import InputError

MAX_SEED = 2 ** 64 - 1                     # torch.Generator.manual_seed's range
MAX_STEPS = 1000                           # SD's training steps: DDIM can take at most one step each
FLOAT32_MAX = 3.4028234663852886e38         # a scale past it overflows the float32 tensor it goes into
MODES = ("replace", "refine", "reweight")
SAMPLERS = ("ddim", "plms")                # p2p/sampler.py's
MAPPERS = ("aligned", "official")          # p2p/align.py's replace mappers
METHODS = ("null-text", "negative-prompt", "ddim", "direct")   # p2p/inversion.py's

Window = float | tuple[float, float]


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
        if value.count(":") > 1:
            raise ValueError(f"not a step window: {value!r} has {value.count(':') + 1} parts (use F or START:END)")
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


def path(value) -> str:
    """A file's path: "" is refused (it would quietly be the working directory)."""
    if text(value) == "":
        raise ValueError("an empty path")
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
    """{word: value}, or ["WORD=VALUE", ...] as the command line gives it (each word once)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        pairs = [v.rpartition("=") for v in value]
        bad = next((v for v, (w, sep, _) in zip(value, pairs) if not sep or not w), None)
        if bad is not None:
            raise ValueError(f"takes WORD=VALUE, got {bad!r}")
        twice = next((w for i, (w, _, _) in enumerate(pairs) if w in [p[0] for p in pairs[:i]]), None)
        if twice is not None:
            raise ValueError(f"{twice!r} given twice")
        value = {w: v for w, _, v in pairs}
    if not isinstance(value, dict):
        raise ValueError(f"a {{word: value}} object, got {value!r}")
    out = {}
    for k, v in value.items():
        try:
            out[text(k)] = of(v)
        except ValueError as e:
            raise ValueError(f"{k}={v}: {e}") from None
    return out


def choice(options):
    def check(value):
        if value not in options:
            raise ValueError(f"one of {', '.join(options)}, got {value!r}")
        return value
    return check


def optional(of):
    return lambda value: None if value is None else of(value)


def side(value) -> int:
    """An image side in pixels: the VAE takes 8 pixels to one latent."""
    value = integer(value, 8)
    if value % 8:
        raise ValueError(f"must be a positive multiple of 8, got {value}")
    return value


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


# ---- the record ---------------------------------------------------------------------------

def meta(check, help: str, **flag) -> dict:
    """A field's check (value -> canonical value, or ValueError) and its help; `flag` holds what the
    command line needs beyond that: metavar, repeat=True for a flag given once per item, many=True
    for one that takes several values."""
    return {"check": check, "help": help, **flag}


def steps_window(help: str):
    return meta(window, help + " (F: the first F of the steps; or START:END)", metavar="F")


@dataclass(frozen=True)
class Experiment:
    """One Prompt-to-Prompt run; each field's help is its flag's (`p2p edit --help`)."""
    source: str = field(metadata=meta(text, "the source prompt (required without --recipe)", metavar="TEXT"))
    targets: tuple[str, ...] = field(metadata=meta(texts, "a target prompt; repeat for several", repeat=True,
                                                               metavar="TEXT"))
    mode: str = field(metadata=meta(choice(MODES), "replace: swap words (same word count); refine: add words; "
                                    "reweight: scale words", metavar="{" + ",".join(MODES) + "}"))
    cross_steps: Window = field(default=0.8, metadata=steps_window("steps with cross-attention replacement"))
    word_steps: dict = field(default_factory=dict, metadata=meta(
        lambda v: mapping(v, window), "a cross-attention window for one word of the targets", metavar="WORD=F",
        many=True))
    self_steps: Window = field(default=0.4, metadata=steps_window("steps with self-attention injection"))
    self_max_tokens: int | None = field(default=None, metadata=meta(
        optional(lambda v: integer(v, 0)), "inject self-attention only in layers with at most this many keys "
        "(default: 256 = 16x16 for a model native to 512 px; (H/32)x(W/32) for one native to another size)",
        metavar="N"))
    blend: tuple[tuple[str, ...], ...] = field(default=(), metadata=meta(
        word_lists, "local blend: one comma-separated word list per prompt, source first", metavar="WORDS", many=True))
    blend_threshold: float = field(default=0.3, metadata=meta(unit, "local blend mask threshold", metavar="T"))
    blend_res: int | None = field(default=None, metadata=meta(
        optional(lambda v: integer(v, 1)), "resolution of the cross-attention maps local blend reads (default: "
        "16, the paper's at 512 px, for a model native to 512 px; the short side / 32 for one native to another size)",
        metavar="R"))
    blend_start: float = field(default=0.0, metadata=meta(
        fraction, "blend only from update int(F * steps) on (0: every update; the null-text notebook uses 0.2)",
        metavar="F"))
    blend_subtract: tuple[tuple[str, ...], ...] = field(default=(), metadata=meta(
        word_lists, "local blend: remove these words' regions from the mask; one comma-separated list per prompt, "
        "source first (the null-text notebook's substruct_words)", metavar="WORDS", many=True))
    blend_mask: str | None = field(default=None, metadata=meta(
        optional(path), "local blend inside a region you drew instead of words' attention: an image whose bright "
        "pixels (> 127) mark it, resized to the latents; where it has alpha, transparent pixels are outside",
        metavar="MASK"))
    reweight: dict = field(default_factory=dict, metadata=meta(
        lambda v: mapping(v, scale), "scale a target word's attention (negative allowed); stacks on replace/refine",
        metavar="WORD=SCALE", many=True))
    replace_mapper: str = field(default="aligned", metadata=meta(
        choice(MAPPERS), "replace: aligned keeps the tokens after a swapped word aligned; official is the authors' "
        "mapper, which shifts them when the swapped words' token counts differ (the README says more)",
        metavar="{" + ",".join(MAPPERS) + "}"))
    sampler: str = field(default="ddim", metadata=meta(
        choice(SAMPLERS), "ddim, or plms: the official SD notebook's scheduler (PNDM without Runge-Kutta steps), "
        "N + 1 UNet calls for N steps", metavar="{" + ",".join(SAMPLERS) + "}"))
    seed: int = field(default=0, metadata=meta(lambda v: integer(v, 0, MAX_SEED),
                                               "seed of the shared initial noise, 0 to 2**64-1", metavar="N"))
    steps: int = field(default=50, metadata=meta(lambda v: integer(v, 1, MAX_STEPS), "sampling steps, 1 to 1000",
                                               metavar="N"))
    guidance: float = field(default=7.5, metadata=meta(number, "classifier-free guidance scale", metavar="G"))
    height: int | None = field(default=None, metadata=meta(
        optional(side), "image height, a multiple of 8 (default: the model's native size, 512, or 768 for SD 2 at "
        "768 px)", metavar="N"))
    width: int | None = field(default=None, metadata=meta(
        optional(side), "image width, a multiple of 8 (default: the model's native size)", metavar="N"))
    image: str | None = field(default=None, metadata=meta(
        optional(path), "edit this photo (--source describes it) instead of sampling from --seed; square, "
        "--height = --width", metavar="PHOTO"))
    inversion: str | None = field(default=None, metadata=meta(
        optional(path), "the photo's inversion from `p2p invert`, which fixes the method, inner steps and offsets "
        "(default: invert first, keeping the result as OUT_DIR/PHOTO.KEY.inversion.safetensors, KEY a hash of the "
        "settings, for the next edit)", metavar="FILE"))
    method: str = field(default="null-text", metadata=meta(
        choice(METHODS), "inversion: null-text (optimised, slow), negative-prompt (no optimisation), plain ddim, or "
        "direct (DDIM inversion whose trajectory the edit's source row follows back to the photo)",
        metavar="{" + ",".join(METHODS) + "}"))
    inner_steps: int = field(default=10, metadata=meta(lambda v: integer(v, 1),
                                                       "null-text: Adam steps per DDIM step at most", metavar="N"))
    offsets: tuple[int, int, int, int] = field(default=(0, 0, 0, 0), metadata=meta(
        offsets, "pixels to crop off the photo's left, right, top and bottom before the centre square",
        metavar="L,R,T,B"))
    cross_sites: tuple[tuple[str, int | str], ...] = field(default=(), metadata=meta(
        sites, "the layers the cross edit acts in: comma-separated PLACE:SIDE, PLACE down, mid, up or any, SIDE the "
        "short side of the feature map (16 for 16x16 at 512 px) or any; `p2p sites` lists them (default: every "
        "layer)", metavar="ITEMS"))
    self_sites: tuple[tuple[str, int | str], ...] = field(default=(), metadata=meta(
        sites, "the layers of the self-attention injection, as --cross-sites; --self-max-tokens applies on top "
        "(default: every layer)", metavar="ITEMS"))

    @property
    def prompts(self) -> list[str]:
        return [self.source, *self.targets]

    def to_json(self) -> dict:
        """Plain JSON values, every field (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


FIELDS = {f.name: f for f in dataclasses.fields(Experiment)}
REQUIRED = tuple(name for name, f in FIELDS.items()
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
NATIVE = ("height", "width", "blend_res", "self_max_tokens")   # None: the model's (run.prepare resolves them)


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


def check_values(data: dict, where: str | None = "record") -> dict:
    """Each field alone, canonical ({field: value}); the first bad or unknown one is one InputError
    naming its path in JSON (`where.field`) or its flag (`where` None)."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise InputError(f"{where or 'flags'}: unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    values = {}
    for field_name, value in data.items():
        try:
            values[field_name] = FIELDS[field_name].metadata["check"](value)
        except ValueError as e:
            raise InputError(f"{name(field_name, where)}: {e}") from None
    return values


def from_json(data: dict, where: str | None = "record") -> Experiment:
    """A record from JSON values, the one validator of records; the first bad entry is one
    InputError naming its path, e.g. "spec.cases[2].cross_steps: a fraction of the steps lies in
    [0, 1], got 1.5" (or its flag, with `where` None: the command line builds records here too)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: an experiment record is a JSON object, got {type(data).__name__}")
    values = check_values(data, where)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"{name(missing[0], where)} is " + ("required (or give --recipe)" if where is None
                                                              else "missing"))
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
