"""The dense-head protocol and its one registry (issue 34, part 1)."""

from __future__ import annotations

import pytest
import torch

from pgd_deploy.config import ModelConfig
from pgd_deploy.models import build
from pgd_deploy.models.fcos import FCOSHead
from pgd_deploy.models.heads import DenseHead, DenseOutputs, Priors, flatten_levels


def test_an_unknown_head_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ValueError, match=r"model.head 'ddod': .* one of \['atss', 'fcos', 'gfl'\]"):
        build.build_detector(ModelConfig(head="ddod", depth=18, fpn_channels=32), num_classes=3)


def test_a_registered_head_is_built_by_name(monkeypatch) -> None:
    monkeypatch.setattr(build, "HEADS", dict(build.HEADS))  # the test's registration stays here

    @build.register_head("toy")
    class Toy(FCOSHead):
        def __init__(self, *, num_classes: int, channels: int, num_convs: int, **_: object) -> None:
            super().__init__(num_classes=num_classes, channels=channels, num_convs=num_convs)
            self.channels, self.num_convs = channels, num_convs

    detector = build.build_detector(
        ModelConfig(head="toy", depth=18, fpn_channels=32, head_convs=2), num_classes=3
    )
    head = detector.head
    assert isinstance(head, Toy) and (head.num_classes, head.channels, head.num_convs) == (3, 32, 2)
    assert build.register_head("toy")(Toy) is Toy  # the same class again: fine
    with pytest.raises(ValueError, match="'toy' is already registered"):
        build.register_head("toy")(type("Other", (FCOSHead,), {}))
    with pytest.raises(TypeError, match="'plain': .* is not a DenseHead"):
        build.register_head("plain")(type("Plain", (torch.nn.Module,), {}))


def test_the_protocol_cannot_be_half_implemented() -> None:
    class Half(DenseHead):
        def forward(self, feats):  # noqa: ANN001, ANN201
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_priors_and_flattening_shapes() -> None:
    centers = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    points = Priors(centers, torch.tensor([8.0, 8.0]), None, (2,))
    with pytest.raises(ValueError, match="anchor-free"):
        _ = points.anchors
    anchors = Priors(centers, torch.tensor([8.0, 8.0]), torch.full((2, 2), 64.0), (2,))
    assert anchors.anchors.tolist() == [[-28.0, -28.0, 36.0, 36.0], [-20.0, -28.0, 44.0, 36.0]]
    levels = [torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5), torch.zeros(2, 3, 2, 3)]
    flat = flatten_levels(levels)
    assert flat.shape == (2, 4 * 5 + 2 * 3, 3)
    assert flat[0, 1].tolist() == [1.0, 21.0, 41.0]  # location (0, 1) of level 0, its 3 channels
    outputs = DenseOutputs([], [], None, [], [])
    assert outputs.quality is None


def test_no_code_outside_models_asks_which_head_it_holds() -> None:
    """Heads plug in behind the protocol: the runtime and serving never name a head, and no
    module outside `models/` compares a head's name or class (the registry in `models/build.py`
    is the one place a name meets a class)."""
    import re
    from pathlib import Path

    import pgd_deploy

    root = Path(pgd_deploy.__file__).parent
    names = "|".join(sorted(build.HEADS))
    for folder in ("runtime", "serve"):
        for path in sorted((root / folder).rglob("*.py")):
            found = re.findall(rf"\b({names})\b", path.read_text(), flags=re.IGNORECASE)
            assert not found, f"{path.relative_to(root)} names a head: {sorted(set(found))}"
    asks = re.compile(r"head\s*(==|!=|\bin\b\s*[(\[{])|isinstance\([^)]*Head\b")
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "models":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not asks.search(line), f"{path.relative_to(root)}:{number}: {line.strip()}"
