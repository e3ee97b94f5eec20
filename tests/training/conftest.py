"""Training-test settings."""

from __future__ import annotations

# torch.optim's first ``step()`` imports torch._dynamo (about 2 s on the CI machine). Paying it at
# collection keeps that one-off import out of whichever test happens to train first.
import torch._dynamo  # noqa: F401
