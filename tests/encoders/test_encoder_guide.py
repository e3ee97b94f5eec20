"""docs/encoders.md's "Writing an encoder" example, run as written: it registers, trains a
step, federates its shared part only, checkpoints and recommends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders import registry
from fedenc.training import load_checkpoint, save_checkpoint

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "encoders.md"


def guide_example() -> str:
    text = GUIDE.read_text()
    section = text[text.index("## Writing an encoder") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the guide's example is gone"
    return match.group(1)


def test_the_guides_encoder_works_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave no trace
    namespace: dict[str, Any] = {"__name__": "guide"}
    exec(compile(guide_example(), str(GUIDE), "exec"), namespace)
    model = namespace["model"]
    assert "gru4rec_lite" in registry.available_encoders()
    assert model.head_parameter_names() == ["embedding.weight"]
    assert model.shared_parameter_names() and all(
        n.startswith("gru.") for n in model.shared_parameter_names()
    )
    with pytest.raises(ValueError, match="has no option 'layer'"):
        registry.build_encoder("gru4rec_lite", 500, hidden=32, layer=2)
    sessions = [[1, 2, 3], [4, 5], [6]]
    batch = batch_from_sessions(sessions)
    batch.targets = torch.tensor([7, 8, 9])
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.gru.weight_hh_l0.grad is not None
    # Padding is masked: a session scores the same alone and beside a longer one.
    alone = model.eval().encode(batch_from_sessions([[6]]))
    assert torch.allclose(model.encode(batch)[2], alone[0], atol=1e-6)
    save_checkpoint(tmp_path / "enc", model)
    loaded, _ = load_checkpoint(tmp_path / "enc")
    ids, _ = loaded.recommend(sessions, k=5)
    assert torch.equal(ids, model.recommend(sessions, k=5)[0])
