"""docs/math.md section 7: the band of weights a 16-bit shadow ignores, checked by a float64 oracle
and against torch's own lerp into fp16 / bf16 (what the engine computes)."""

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

FORMATS = {"bf16": (torch.bfloat16, 8), "fp16": (torch.float16, 11)}  # dtype, precision bits


def _round(x: float, bits: int) -> float:
    """float64 -> the nearest value with ``bits`` significant bits, ties to even: one exact
    rounding (x / spacing is exact in float64, and round() rounds half to even)."""
    spacing = 2.0 ** (math.frexp(x)[1] - bits)
    return round(x / spacing) * spacing


def _threshold(bits: int, ema: float, d: float, sign: float) -> float:
    """The smallest relative distance r of w = ema (1 + sign r) that moves the shadow: the exact
    update ema + (1 - d)(w - ema) in float64, rounded once to the shadow's format."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        r = 0.5 * (lo + hi)
        moved = _round(ema + (1 - d) * (ema * sign * r), bits) != ema
        lo, hi = (lo, r) if moved else (r, hi)
    return hi


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [0.99, 0.999])
def test_the_ignored_band_is_u_over_2_1_minus_d_to_u_over_1_minus_d(fmt, d):
    dtype, bits = FORMATS[fmt]
    u = 2.0**-bits
    top = u / (1 - d)
    below_two = 2.0 - 2 * u  # the largest value of the format below 2
    for ema in (1.0, 1.5, below_two, 2.0**-20, 3.0 * 2.0**10):
        for sign in (1.0, -1.0):
            r = _threshold(bits, ema, d, sign)
            assert top / 2 * (1 - 1e-9) <= r <= top * (1 + 1e-9), (ema, sign, r)
    # both ends are reached: the top moving up from a power of two, the bottom moving down
    assert _threshold(bits, 1.0, d, 1.0) == pytest.approx(top, rel=1e-9)
    assert _threshold(bits, 1.0, d, -1.0) == pytest.approx(top / 2, rel=1e-9)
    # torch's lerp (fp32 opmath, then rounded to the shadow) agrees on both sides of the band
    shadow = torch.ones(1, dtype=dtype)
    for r, moves in ((0.98 * top, False), (1.02 * top, True)):
        w = torch.tensor([1.0 + r], dtype=torch.float32).to(dtype)
        assert (torch.lerp(shadow, w, 1 - d).item() != 1.0) == moves, (r, moves)


def test_the_documented_figures_and_warning_criterion():
    """The numbers quoted in docs/math.md follow from u / (1 - d) (the old text said a bf16
    shadow at 0.999 ignores weights within ~40 %: that is d = 0.99)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "math.md").read_text(encoding="utf-8")
    section = text[text.index("## 7. Low-precision"):text.index("## 8.")]
    u_bf16, u_fp16 = 2.0 ** -FORMATS["bf16"][1], 2.0 ** -FORMATS["fp16"][1]
    dash, minus = "\u2013", "\u2212"  # the doc's en dash and minus sign
    quoted = {
        f"19.5{dash}39.1 %": (u_bf16, 0.99), f"195{dash}391 %": (u_bf16, 0.999),
        f"2.44{dash}4.88 %": (u_fp16, 0.99), f"24.4{dash}48.8 %": (u_fp16, 0.999),
    }
    for figure, (u, d) in quoted.items():
        assert figure in section, figure
        low, high = (float(x) for x in figure.rstrip(" %").split(dash))
        assert low == pytest.approx(100 * u / (2 * (1 - d)), rel=3e-3)
        assert high == pytest.approx(100 * u / (1 - d), rel=3e-3)
    assert f"u / (1 {minus} d) > 0.01" in section  # (8a), the warning's criterion
    assert "`d > 0.609`" in section and math.floor(1000 * (1 - 100 * u_bf16)) == 609
    assert "`d > 0.951`" in section and math.floor(1000 * (1 - 100 * u_fp16)) == 951
    assert "40 %" not in section
