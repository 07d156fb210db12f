"""Router health: when does a routed expert count as collapsed.

An expert that gets under `COLLAPSE_MIN_SHARE` (1%) of the tokens of its projection for
`COLLAPSE_WINDOW` (3) consecutive log intervals is collapsed. An expert's share of the tokens
is top_k times its `router_load` (the fraction of the routed (token, expert) assignments,
which sums to 1 over the experts). The thresholds live here, beside the detector; plots
draw them too.
"""

from __future__ import annotations

import math

COLLAPSE_MIN_SHARE = 0.01  # an expert under this share of its projection's tokens ...
COLLAPSE_WINDOW = 3  # ... for this many consecutive log intervals is collapsed


class CollapseDetector:
    """Tracks, per projection and expert, how many consecutive log intervals the expert got
    under `min_share` of the tokens.

    `update({projection: [share of tokens per expert]})` returns the collapsed experts
    {projection: [expert, ...]} (streak >= window); `newly_collapsed` holds those that
    reached the window at this update (what to warn about once). An interval in which a
    projection routed no token at all is no evidence either way and is skipped for it.
    """

    def __init__(self, min_share: float = COLLAPSE_MIN_SHARE, window: int = COLLAPSE_WINDOW):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.min_share, self.window = min_share, window
        self.streak: dict[str, list[int]] = {}
        self.newly_collapsed: dict[str, list[int]] = {}

    def update(self, shares: dict[str, list[float]]) -> dict[str, list[int]]:
        collapsed: dict[str, list[int]] = {}
        self.newly_collapsed = {}
        for target, values in shares.items():
            streak = self.streak.setdefault(target, [0] * len(values))
            if not any(v > 0 for v in values) or any(math.isnan(v) for v in values):
                pass  # nothing routed in this interval: keep the streaks as they are
            else:
                for e, v in enumerate(values):
                    streak[e] = streak[e] + 1 if v < self.min_share else 0
                    if streak[e] == self.window:
                        self.newly_collapsed.setdefault(target, []).append(e)
            experts = [e for e, n in enumerate(streak) if n >= self.window]
            if experts:
                collapsed[target] = experts
        return collapsed


def collapse_warning(newly: dict[str, list[int]], loads: dict[str, list[float]], min_share: float = COLLAPSE_MIN_SHARE,
                     window: int = COLLAPSE_WINDOW, max_listed: int = 6) -> str:
    """One warning line about the projections whose experts just collapsed."""
    items = list(newly.items())
    listed = "; ".join(
        f"{target}: expert(s) {', '.join(map(str, experts))} (load {', '.join(f'{loads[target][e]:.4f}' for e in experts)})"
        for target, experts in items[:max_listed]
    )
    more = f"; and {len(items) - max_listed} more projection(s)" if len(items) > max_listed else ""
    return (
        f"[medcare_dist] warning: router collapse: {listed}{more}: under {min_share:.0%} of the tokens for "
        f"{window} consecutive log intervals. Consider router_aux_loss_coef > 0 (load-balancing loss) "
        "or a lower lr."
    )
