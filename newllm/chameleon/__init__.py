"""Chameleon (seeds/000): personalize a frozen base LLM with no weight update.

Per target layer, a personal direction θ_p and a neutral direction θ_n are estimated from
the model's own generations (self-generate, estimate-directions); at inference, forward hooks
add `alpha·proj_p(x) − |beta|·proj_n(x)` to chosen MLP outputs (eval-chameleon, generate).
Stages live in `stages/`; this package holds the line's data, estimation, editing and
scoring code.
"""

GENERATIONS_KIND = "chameleon-generations"
DIRECTIONS_KIND = "chameleon-directions"
