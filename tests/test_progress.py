"""Progress reporting: analyses report (desc, done, total) to the callback set by the caller."""

from __future__ import annotations

from workbench.progress import reporting, steps


def test_steps_report_to_the_callback_and_reset():
    calls: list[tuple[str, int, int]] = []
    with reporting(lambda d, i, n: calls.append((d, i, n))):
        assert list(steps("abc", desc="x")) == ["a", "b", "c"]
    assert calls == [("x", 0, 3), ("x", 1, 3), ("x", 2, 3), ("x", 3, 3)]
    assert list(steps(range(2))) == [0, 1]  # no callback outside the block
    assert len(calls) == 4


def test_activation_patching_reports_progress(load):
    import torch

    from workbench.analyses.activation_patching import ActivationPatchingParams
    from workbench.analyses.activation_patching.compute import activation_patching
    from workbench.types import PromptSet

    model = load("tiny-llama")
    clean = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[:, 3:] = (corrupt[:, 3:] + 1) % 50
    ps = PromptSet("t", clean, corrupt, torch.tensor([1, 2]), torch.tensor([3, 4]))
    calls: list[tuple[str, int, int]] = []
    with reporting(lambda d, i, n: calls.append((d, i, n))):
        activation_patching(model, ps, ActivationPatchingParams(component="z", batch_tokens=6))
    total = calls[0][2]
    assert total > 1 and calls[-1] == (calls[0][0], total, total)
    assert [c[1] for c in calls] == list(range(total + 1))
