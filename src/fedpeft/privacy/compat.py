"""Which client-level DP modes a method's aggregation admits, from its registry capabilities.

Central and distributed DP add the Gaussian noise to the *sum* of the clipped updates: that privatises
the round only when the server step is a (uniformly weighted) mean of the uploads (``dp_mean``: FedIT,
FedProx, FFA-LoRA, FedSA-LoRA's shared part, with any server optimizer stepping on that mean). A server
step that reads each update (stacking, clustering, SVD, robust rules) sees every update un-noised, so
only local DP (each client noises its own upload; the server's work is post-processing) applies.
"""

from __future__ import annotations

from typing import Any


def privacy_problems(privacy: Any, method: str, caps: Any, robust_rule: str = "none") -> list[str]:
    """One line per problem of ``privacy`` (a PrivacyConfig) with method ``method`` (its Capabilities)."""
    if not privacy.client_level:
        return []
    if caps.dp_refusal:
        return [f"privacy.mode={privacy.mode}: method '{method}' refuses client-level DP: {caps.dp_refusal}"]
    lines = []
    if privacy.mode in ("central", "distributed") and not caps.dp_mean:
        lines.append(f"privacy.mode={privacy.mode}: method '{method}' does not aggregate by a mean of the uploads "
                     "(its server step reads each client's update), so noise on their sum does not privatise it; "
                     "use privacy.mode=local (each client noises its own upload)")
    if privacy.mode in ("central", "distributed") and robust_rule != "none":
        lines.append(f"privacy.mode={privacy.mode} with federation.robust.rule={robust_rule}: the noise is calibrated "
                     "for the mean of clipped updates, and a robust rule reads each update; use rule none (its "
                     "clip_norm is fine) or privacy.mode=local")
    return lines
