"""The attention-site IR: what capture finds and every later stage refers to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a self-attention sequence: a frames x rows x cols video grid plus an optional text span.

    Video tokens are frame-major (frame, row, col), as every supported diffusers class patchifies them; text tokens
    form one contiguous span before or after the video tokens (``text_position``) in joint-attention models.
    """

    frames: int
    rows: int
    cols: int
    text_tokens: int = 0
    text_position: str = "none"  # "before" | "after" | "none"

    def __post_init__(self) -> None:
        if min(self.frames, self.rows, self.cols) < 1:
            raise ValueError(f"TokenLayout needs frames, rows and cols >= 1, got {self.frames}x{self.rows}x{self.cols}")
        if self.text_position not in ("before", "after", "none"):
            raise ValueError(f"text_position must be 'before', 'after' or 'none', got {self.text_position!r}")
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError(
                f"text_tokens={self.text_tokens} and text_position={self.text_position!r} disagree; "
                "give text_position 'before'/'after' exactly when text_tokens > 0"
            )

    @property
    def video_tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_span(self) -> tuple[int, int]:
        start = self.text_tokens if self.text_position == "before" else 0
        return start, start + self.video_tokens

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttentionSite:
    """One call of scaled-dot-product attention in the captured graph.

    ``name`` is the calling module's path plus the call's index inside it (``blocks.3.attn1#0``): stable across
    resolutions, so a plan made at one size applies at another.
    """

    name: str
    layer: int
    kind: str  # "self" | "cross"
    heads: int
    head_dim: int
    q_tokens: int
    kv_tokens: int
    dtype: str
    layout: TokenLayout | None = None
    mask: str = "none"  # "none" | "key_padding" | "other": the attn_mask the model passes
    unsupported_reason: str = ""  # non-empty: this site always stays dense, and why
    node_name: str = field(default="", compare=False)

    @property
    def sparsifiable(self) -> bool:
        return self.kind == "self" and self.layout is not None and not self.unsupported_reason

    def describe(self) -> str:
        layout = ""
        if self.layout is not None:
            lay = self.layout
            layout = f" video {lay.frames}x{lay.rows}x{lay.cols}" + (
                f" + {lay.text_tokens} text ({lay.text_position})" if lay.text_tokens else ""
            )
        note = f" [dense only: {self.unsupported_reason}]" if self.unsupported_reason else ""
        return (
            f"{self.name}: {self.kind} H{self.heads} D{self.head_dim} "
            f"q{self.q_tokens} kv{self.kv_tokens} {self.dtype}{layout}{note}"
        )
