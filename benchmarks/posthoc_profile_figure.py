"""The figure of docs/math.md section 11: synthesised power-EMA profiles against their targets.

    python benchmarks/posthoc_profile_figure.py

Snapshots of sigma_rel 0.05 and 0.10 every 1000 steps of a 20000-step run; the profile of the
average synthesised for sigma_rel 0.07 (inside the supported range) and 0.015 (outside it: its
profile error is above 0.02, so emakit refuses it by default), each against its target profile.
Writes docs/images/posthoc-profiles.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emakit.cli.figures import pyplot, save_png
from emakit.posthoc import solve
from emakit.posthoc.profiles import density, gammas_of

STEPS = [t for t in range(1000, 20001, 1000) for _ in range(2)]
SIGMAS = [0.05, 0.10] * 20


def main() -> None:
    t = np.linspace(0, 20000, 4001)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=False)
    for ax, target in zip(axes, (0.07, 0.015)):
        found = solve(STEPS, SIGMAS, 20000, [target])
        c = found.coefficients[:, 0]
        mix = sum(ci * density(t, step=s, gamma=g)
                  for ci, s, g in zip(c, STEPS, gammas_of(SIGMAS)))
        ax.plot(t, density(t, step=20000, gamma=gammas_of([target])[0]) * 20000, lw=2.5,
                color="C1", label=f"target: power EMA, sigma_rel {target}")
        error = found.profile_errors[0]
        ax.plot(t, mix * 20000, "--", lw=1.5, color="C0",
                label=f"synthesised from 40 snapshots (profile error {error:.2g})")
        big = np.argsort(-np.abs(c))[:3]
        for k in big:
            ax.plot(t, c[k] * density(t, step=STEPS[k], gamma=gammas_of([SIGMAS[k]])[0]) * 20000,
                    ":", lw=1, color="gray")
        ax.plot([], [], ":", color="gray", label="its largest terms c_i p_i")
        ax.set(xlabel="optimizer step", ylabel="weight per step x T",
               xlim=(12000, 20200),
               title=("supported" if found.profile_errors[0] <= 0.02 else
                      "outside the supported range (refused by default)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("post-hoc EMA at step 20000 from snapshots of sigma_rel 0.05 and 0.10 every "
                 "1000 steps")
    out = Path(__file__).resolve().parents[1] / "docs" / "images" / "posthoc-profiles.png"
    save_png(fig, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
