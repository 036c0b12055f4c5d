from __future__ import annotations

import torch

from vdopt.capture import capture
from vdopt.sites import TokenLayout

EXPECTED = {  # model: (self sites, cross sites, layout)
    "dit": (2, 2, TokenLayout(4, 4, 6)),
    "wan": (2, 2, TokenLayout(4, 4, 6)),
    "cogvideox": (2, 0, TokenLayout(3, 4, 6, 7, "before")),
    "hunyuan": (3, 0, TokenLayout(3, 4, 6, 6, "after")),
    "ltx": (2, 2, TokenLayout(3, 4, 6)),
}


def test_every_attention_call_becomes_a_site(any_model) -> None:
    name, model, kwargs = any_model
    captured = capture(model, kwargs)
    n_self, n_cross, layout = EXPECTED[name]
    assert captured.layout == layout
    assert sum(s.kind == "self" for s in captured.sites) == n_self
    assert sum(s.kind == "cross" for s in captured.sites) == n_cross
    assert len({s.name for s in captured.sites}) == len(captured.sites)
    for site in captured.sites:
        assert site.heads == 2 and site.head_dim in (16, 24)
        assert site.dtype == "float32"
        if site.sparsifiable:
            assert site.q_tokens == site.kv_tokens == layout.total_tokens
            assert site.layout == layout


def test_hunyuan_refiner_stays_dense_with_reason() -> None:
    from conftest import tiny_hunyuan

    model, kwargs = tiny_hunyuan()
    sites = capture(model, kwargs).sites
    refiner = [s for s in sites if "refiner" in s.name]
    assert refiner and all(not s.sparsifiable and "attn_mask" in s.unsupported_reason for s in refiner)
    joint = [s for s in sites if "refiner" not in s.name]
    assert all(s.sparsifiable and s.mask == "key_padding" for s in joint)


def test_user_layout_overrides_inference() -> None:
    from conftest import tiny_dit

    model, kwargs = tiny_dit()
    wrong = TokenLayout(2, 8, 6)  # same token count, other grid
    assert capture(model, kwargs, layout=wrong).sites[0].layout == wrong
    mismatched = TokenLayout(1, 2, 2)
    site = capture(model, kwargs, layout=mismatched).sites[0]
    assert not site.sparsifiable and "do not match" in site.unsupported_reason
    assert torch.is_tensor(kwargs["hidden_states"])
