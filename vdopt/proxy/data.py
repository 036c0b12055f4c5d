"""Procedural captioned videos: coloured shapes that move over simple backgrounds.

A clip holds 1-3 objects painted back to front (later objects occlude earlier ones), each with a shape,
colour, size and motion, over a plain or textured background that the camera may pan across. The caption
is generated from the same attributes by a small grammar, e.g.
``"a small red square moves left while a blue circle bounces on a striped background"``.

Everything is deterministic from a seed: scene attributes are drawn on the CPU with a seeded
``torch.Generator`` (so captions do not depend on the device), and rendering is a pure, vectorised function
of the attributes that runs on whatever device is asked for (the GPU during training).

Evaluation captions are held out by attribute combination: a fixed set of (colour, shape, motion) triples
never appears in any training clip, and ``held_out_prompts()`` is built from exactly those triples.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.78, 0.22),
    "blue": (0.15, 0.32, 0.95),
    "yellow": (0.96, 0.88, 0.12),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.62, 0.22, 0.86),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.88),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Half-extent in units of the frame height. "medium" is never spoken in captions.
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.14, "large": 0.19}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
MOTIONS: tuple[str, ...] = (
    "moves left", "moves right", "moves up", "moves down", "moves in a circle",
    "bounces", "grows", "shrinks", "stays still",
)
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "striped", "checkered")
PANS: tuple[str, ...] = ("none", "left", "right")
MAX_OBJECTS = 3

# Probabilities of 1, 2 and 3 objects: mostly single objects so a small model learns the grammar quickly.
_OBJECT_COUNT_PROBS = (0.5, 0.35, 0.15)
_LINEAR_TRAVEL = 0.45  # distance covered by "moves <direction>", in frame heights
_CIRCLE_RADIUS = 0.2
_BOUNCE_HEIGHT = 0.42
_PAN_TRAVEL = 0.35
_TEXTURED = (BACKGROUNDS.index("striped"), BACKGROUNDS.index("checkered"))

# (colour, shape, motion) triples that no training clip contains. Chosen by hand to spread over every
# colour, shape and motion, so each attribute is still seen in training, only never in these combinations.
HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "moves right"),
    ("green", "square", "bounces"),
    ("blue", "triangle", "moves left"),
    ("yellow", "diamond", "moves in a circle"),
    ("white", "cross", "moves down"),
    ("purple", "square", "grows"),
    ("orange", "circle", "moves up"),
    ("cyan", "triangle", "shrinks"),
    ("red", "diamond", "stays still"),
    ("blue", "circle", "bounces"),
)
# Noise seeds that evaluation pairs with each held-out prompt.
HELD_OUT_SEEDS: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class VideoSpec:
    """Clip geometry: frames and pixel size."""

    num_frames: int = 8
    height: int = 48
    width: int = 48


@dataclass
class SceneBatch:
    """Attributes of ``B`` clips with up to ``MAX_OBJECTS`` object slots each.

    Object tensors are ``[B, MAX_OBJECTS]``; slot order is paint order (later slots occlude earlier ones) and
    caption order. ``x``/``y`` are path centres in frame heights (x in ``[0, width/height]``, y down).
    """

    active: torch.Tensor  # bool
    shape: torch.Tensor  # long, index into SHAPES
    colour: torch.Tensor  # long, index into COLOUR_NAMES
    size: torch.Tensor  # long, index into SIZE_NAMES
    motion: torch.Tensor  # long, index into MOTIONS
    x: torch.Tensor  # float
    y: torch.Tensor  # float
    background: torch.Tensor  # long [B], index into BACKGROUNDS
    pan: torch.Tensor  # long [B], index into PANS

    def __len__(self) -> int:
        return self.active.shape[0]

    def to(self, device: torch.device | str) -> SceneBatch:
        return SceneBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def _held_out_mask(colour: torch.Tensor, shape: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(colour, dtype=torch.bool)
    for c, s, m in HELD_OUT_TRIPLES:
        mask |= (colour == COLOUR_NAMES.index(c)) & (shape == SHAPES.index(s)) & (motion == MOTIONS.index(m))
    return mask


def sample_scenes(batch_size: int, generator: torch.Generator, *, aspect: float = 1.0) -> SceneBatch:
    """Draw ``batch_size`` training scenes on the CPU; no object ever has a held-out (colour, shape, motion)."""
    g, b, k = generator, batch_size, MAX_OBJECTS
    count = torch.multinomial(torch.tensor(_OBJECT_COUNT_PROBS), b, replacement=True, generator=g) + 1
    active = torch.arange(k).unsqueeze(0) < count.unsqueeze(1)
    # Distinct colours within a clip, so every object in a caption is identifiable by its colour.
    colour = torch.rand(b, len(COLOURS), generator=g).argsort(dim=1)[:, :k]
    shape = torch.randint(len(SHAPES), (b, k), generator=g)
    size = torch.randint(len(SIZES), (b, k), generator=g)
    motion = torch.randint(len(MOTIONS), (b, k), generator=g)
    # Rejection by resampling the motion: each (colour, shape) pair holds out at most a few motions.
    while (bad := _held_out_mask(colour, shape, motion) & active).any():
        motion[bad] = torch.randint(len(MOTIONS), (int(bad.sum()),), generator=g)
    x = (0.3 + 0.4 * torch.rand(b, k, generator=g)) * aspect
    y = 0.3 + 0.4 * torch.rand(b, k, generator=g)
    background = torch.randint(len(BACKGROUNDS), (b,), generator=g)
    pan = torch.randint(len(PANS), (b,), generator=g)
    # Pans are only sampled over textured backgrounds, where the camera motion is visible.
    textured = (background == _TEXTURED[0]) | (background == _TEXTURED[1])
    pan = torch.where(textured, pan, torch.zeros_like(pan))
    return SceneBatch(active, shape, colour, size, motion, x, y, background, pan)


def _trajectories(scenes: SceneBatch, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Object centres and half-extents per frame, each ``[B, K, F]``, in frame heights."""
    device = scenes.x.device
    t = torch.linspace(0.0, 1.0, num_frames, device=device).view(1, 1, -1)
    m = scenes.motion.unsqueeze(-1)
    x0, y0 = scenes.x.unsqueeze(-1), scenes.y.unsqueeze(-1)
    zero = torch.zeros_like(t)
    dx = torch.where(m == MOTIONS.index("moves left"), -_LINEAR_TRAVEL * (t - 0.5), zero)
    dx = torch.where(m == MOTIONS.index("moves right"), _LINEAR_TRAVEL * (t - 0.5), dx)
    dy = torch.where(m == MOTIONS.index("moves up"), -_LINEAR_TRAVEL * (t - 0.5), zero)
    dy = torch.where(m == MOTIONS.index("moves down"), _LINEAR_TRAVEL * (t - 0.5), dy)
    # Seven eighths of a turn over the clip, so the first and last frames differ.
    angle = 2 * math.pi * t * (num_frames - 1) / num_frames
    circle = m == MOTIONS.index("moves in a circle")
    dx = torch.where(circle, _CIRCLE_RADIUS * torch.cos(angle) - _CIRCLE_RADIUS, dx)
    dy = torch.where(circle, _CIRCLE_RADIUS * torch.sin(angle), dy)
    # Two bounces off a floor 0.2 below the path centre.
    bounce = m == MOTIONS.index("bounces")
    dy = torch.where(bounce, 0.2 - _BOUNCE_HEIGHT * torch.abs(torch.sin(2 * math.pi * t)), dy)
    base = torch.tensor(list(SIZES.values()), device=device)[scenes.size].unsqueeze(-1)
    scale = torch.ones_like(dx)
    scale = torch.where(m == MOTIONS.index("grows"), 0.5 + t, scale)
    scale = torch.where(m == MOTIONS.index("shrinks"), 1.5 - t, scale)
    # The camera moving left shifts the whole scene right in the image, and the reverse.
    pan_dir = (scenes.pan == PANS.index("left")).float() - (scenes.pan == PANS.index("right")).float()
    camera = pan_dir.view(-1, 1, 1) * _PAN_TRAVEL * (t - 0.5)
    return x0 + dx + camera, y0 + dy, base * scale


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A distance-like field that is 1 on each shape's outline, < 1 inside; u, v in half-extents."""
    au, av = u.abs(), v.abs()
    square = torch.maximum(au, av)
    circle = torch.sqrt(u * u + v * v)
    # Apex up (v grows downwards): inside where v <= 1 and |u| <= 0.6 (v + 1).
    triangle = torch.maximum(v, au / 0.6 - v)
    diamond = (au + av) / 1.3
    cross = torch.minimum(torch.maximum(au, av + 0.62), torch.maximum(au + 0.62, av))
    fields = torch.stack([square, circle, triangle, diamond, cross], dim=0)
    return torch.gather(fields, 0, shape.unsqueeze(0)).squeeze(0)


def _background(scenes: SceneBatch, spec: VideoSpec, device: torch.device) -> torch.Tensor:
    """Background frames ``[B, F, H, W, 3]``; textures move with the camera."""
    b, f, h, w = len(scenes), spec.num_frames, spec.height, spec.width
    t = torch.linspace(0.0, 1.0, f, device=device)
    pan_dir = (scenes.pan == PANS.index("left")).float() - (scenes.pan == PANS.index("right")).float()
    camera = pan_dir.view(-1, 1) * _PAN_TRAVEL * (t - 0.5)  # [B, F] in frame heights
    xs = (torch.arange(w, device=device) + 0.5) / h
    ys = (torch.arange(h, device=device) + 0.5) / h
    u = xs.view(1, 1, 1, w) - camera.view(b, f, 1, 1)  # texture coordinates follow the scene
    v = ys.view(1, 1, h, 1).expand(b, f, h, w)
    # Soft-edged square waves: sharp enough to read as stripes, smooth enough to pan by sub-pixels.
    stripes = torch.clamp(3.0 * torch.sin(2 * math.pi * u / 0.25), -1.0, 1.0).expand(b, f, h, w)
    checks = torch.clamp(3.0 * torch.sin(2 * math.pi * u / 0.33) * torch.sin(2 * math.pi * v / 0.33), -1.0, 1.0)
    bg_id = scenes.background.view(b, 1, 1, 1)
    grey = torch.full((b, f, h, w), 0.04, device=device)
    grey = torch.where(bg_id == BACKGROUNDS.index("gray"), torch.full_like(grey, 0.42), grey)
    grey = torch.where(bg_id == BACKGROUNDS.index("checkered"), 0.26 + 0.1 * checks, grey)
    frames = grey.unsqueeze(-1).expand(b, f, h, w, 3).clone()
    striped_rgb = torch.stack([0.18 + 0.08 * stripes, 0.2 + 0.08 * stripes, 0.32 + 0.1 * stripes], dim=-1)
    return torch.where((bg_id == BACKGROUNDS.index("striped")).unsqueeze(-1), striped_rgb, frames)


def render(scenes: SceneBatch, spec: VideoSpec = VideoSpec(), device: torch.device | str | None = None) -> torch.Tensor:
    """Render scenes to video ``[B, F, H, W, 3]`` in ``[0, 1]`` on ``device`` (default: the scenes' device)."""
    device = torch.device(device) if device is not None else scenes.x.device
    scenes = scenes.to(device)
    h, w = spec.height, spec.width
    video = _background(scenes, spec, device)
    cx, cy, half = _trajectories(scenes, spec.num_frames)  # [B, K, F]
    xs = (torch.arange(w, device=device) + 0.5) / h
    ys = (torch.arange(h, device=device) + 0.5) / h
    u = (xs.view(1, 1, 1, 1, w) - cx.unsqueeze(-1).unsqueeze(-1)) / half.unsqueeze(-1).unsqueeze(-1)
    v = (ys.view(1, 1, 1, h, 1) - cy.unsqueeze(-1).unsqueeze(-1)) / half.unsqueeze(-1).unsqueeze(-1)
    shape = scenes.shape.view(*scenes.shape.shape, 1, 1, 1).expand_as(u + v)
    dist = _shape_distance(shape, u, v)  # [B, K, F, H, W]
    # One-pixel anti-aliased edge: (1 - dist) * half-extent in pixels.
    alpha = torch.clamp((1.0 - dist) * half.unsqueeze(-1).unsqueeze(-1) * h + 0.5, 0.0, 1.0)
    alpha = alpha * scenes.active.view(*scenes.active.shape, 1, 1, 1).float()
    palette = torch.tensor(list(COLOURS.values()), device=device)[scenes.colour]  # [B, K, 3]
    for slot in range(MAX_OBJECTS):
        a = alpha[:, slot].unsqueeze(-1)  # [B, F, H, W, 1]
        video = video * (1.0 - a) + palette[:, slot].view(-1, 1, 1, 1, 3) * a
    return video


def _object_phrase(size: int, colour: int, shape: int, motion: int) -> str:
    adjectives = ([] if SIZE_NAMES[size] == "medium" else [SIZE_NAMES[size]]) + [COLOUR_NAMES[colour]]
    article = "an" if adjectives[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(adjectives)} {SHAPES[shape]} {MOTIONS[motion]}"


def captions(scenes: SceneBatch) -> list[str]:
    """One caption per clip, from the grammar: objects joined by 'while'/'and', background, camera pan."""
    out = []
    for i in range(len(scenes)):
        phrases = [
            _object_phrase(int(scenes.size[i, k]), int(scenes.colour[i, k]), int(scenes.shape[i, k]),
                           int(scenes.motion[i, k]))
            for k in range(MAX_OBJECTS) if scenes.active[i, k]
        ]
        text = phrases[0]
        if len(phrases) > 1:
            text += " while " + phrases[1]
        if len(phrases) > 2:
            text += " and " + phrases[2]
        text += f" on a {BACKGROUNDS[int(scenes.background[i])]} background"
        if PANS[int(scenes.pan[i])] != "none":
            text += f" as the camera pans {PANS[int(scenes.pan[i])]}"
        out.append(text)
    return out


@dataclass(frozen=True)
class ParsedCaption:
    """A caption read back into attribute names: objects as (size, colour, shape, motion)."""

    objects: tuple[tuple[str, str, str, str], ...]
    background: str
    pan: str


_OBJECT_RE = (
    rf"an? (?:({'|'.join(s for s in SIZE_NAMES if s != 'medium')}) )?({'|'.join(COLOUR_NAMES)}) "
    rf"({'|'.join(SHAPES)}) ({'|'.join(MOTIONS)})"
)
_CAPTION_RE = re.compile(
    rf"^{_OBJECT_RE}(?: while {_OBJECT_RE})?(?: and {_OBJECT_RE})? on a ({'|'.join(BACKGROUNDS)}) background"
    rf"(?: as the camera pans (left|right))?$"
)


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of the grammar; raises ValueError naming the caption if it is not one."""
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(f"Caption {text!r} is not in the proxy grammar; see vdopt.proxy.data.captions for its form.")
    groups = match.groups()
    objects = tuple(
        (groups[i] or "medium", groups[i + 1], groups[i + 2], groups[i + 3])
        for i in range(0, 4 * MAX_OBJECTS, 4) if groups[i + 1] is not None
    )
    return ParsedCaption(objects, groups[-2], groups[-1] or "none")


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words = {"a", "an", "while", "and", "on", "background", "as", "the", "camera", "pans"}
    for name in (*SHAPES, *COLOUR_NAMES, *SIZE_NAMES, *MOTIONS, *BACKGROUNDS, *PANS):
        words.update(name.split())
    words -= {"medium", "none"}
    return sorted(words)


def training_batch(
    batch_size: int, seed: int, step: int, spec: VideoSpec = VideoSpec(), device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[str]]:
    """Training clips for one step: video ``[B, F, H, W, 3]`` in ``[0, 1]`` on ``device`` and captions.

    Deterministic in ``(seed, step)``; never contains a held-out (colour, shape, motion) triple.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    scenes = sample_scenes(batch_size, generator, aspect=spec.width / spec.height)
    return render(scenes, spec, device), captions(scenes)


def _held_out_scenes(aspect: float = 1.0) -> SceneBatch:
    """One clip per held-out triple (alone, on a fixed background), then a few two-object clips."""
    singles = [(triple, None) for triple in HELD_OUT_TRIPLES]
    # Pair held-out objects with an ordinary object of a different colour and shape.
    pairs = [
        (HELD_OUT_TRIPLES[0], ("yellow", "square", "moves left")),
        (HELD_OUT_TRIPLES[2], ("white", "circle", "stays still")),
        (HELD_OUT_TRIPLES[6], ("green", "diamond", "moves right")),
        (HELD_OUT_TRIPLES[7], ("red", "square", "moves down")),
    ]
    clips = singles + pairs
    b, k = len(clips), MAX_OBJECTS
    fields = {name: torch.zeros(b, k, dtype=torch.long) for name in ("shape", "colour", "size", "motion")}
    active = torch.zeros(b, k, dtype=torch.bool)
    for i, (first, second) in enumerate(clips):
        for slot, (c, s, m) in enumerate(o for o in (first, second) if o is not None):
            active[i, slot] = True
            fields["colour"][i, slot] = COLOUR_NAMES.index(c)
            fields["shape"][i, slot] = SHAPES.index(s)
            fields["motion"][i, slot] = MOTIONS.index(m)
            fields["size"][i, slot] = SIZE_NAMES.index("large" if (i + slot) % 3 == 0 else "medium")
    x = torch.tensor([[0.5, 0.35, 0.65]]).expand(b, k) * aspect
    y = torch.tensor([[0.5, 0.6, 0.4]]).expand(b, k).clone()
    background = torch.tensor([i % len(BACKGROUNDS) for i in range(b)])
    pan = torch.zeros(b, dtype=torch.long)
    return SceneBatch(active, fields["shape"], fields["colour"], fields["size"], fields["motion"], x.clone(), y,
                      background, pan)


def held_out_prompts() -> list[str]:
    """Fixed evaluation captions (14), each containing a (colour, shape, motion) triple no training clip has."""
    return captions(_held_out_scenes())


def held_out_pairs() -> list[tuple[str, int]]:
    """Evaluation (caption, noise seed) pairs: every held-out prompt with every seed in ``HELD_OUT_SEEDS``."""
    return list(itertools.product(held_out_prompts(), HELD_OUT_SEEDS))


def held_out_references(spec: VideoSpec = VideoSpec()) -> torch.Tensor:
    """Rendered ground-truth clips for ``held_out_prompts()``, ``[P, F, H, W, 3]`` in ``[0, 1]``."""
    return render(_held_out_scenes(spec.width / spec.height), spec, "cpu")
