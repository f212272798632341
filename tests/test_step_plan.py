"""The per-step withdrawal plan against a brute-force per-token simulation."""

import numpy as np
import pytest

from vtw_vllm.step_plan import BatchVision, plan_step
from vtw_vllm.vision_ranges import RequestVision


def _batch(ks, ranges) -> BatchVision:
    return BatchVision.of([RequestVision(k, r) for k, r in zip(ks, ranges, strict=True)])


def test_docstring_example():
    # A: 2 text, 3 vision (positions 2-4), 1 text, K=4; B: 2 text tokens, no image.
    plan = plan_step([6, 2], [0, 0], _batch([4, 8], [((2, 5),), ()]), [0, 4])
    assert [w.layer for w in plan.withdrawals] == [4]
    assert plan.withdrawals[0].keep_index.tolist() == [0, 1, 5, 6, 7]
    assert plan.out_index.tolist() == [0, 1, 5, 6, 7]
    assert 0 not in plan.groups  # layers 0-3 see everything: stock layout
    g = plan.groups[4]
    assert g.logical_positions.tolist() == [0, 1, 2, 0, 1]
    assert g.positions.tolist() == [0, 1, 5, 0, 1]
    assert g.query_start_loc.tolist() == [0, 3, 5]
    assert g.seq_lens.tolist() == [3, 2]


def test_nothing_to_withdraw_is_stock():
    # K=N; no image
    assert plan_step([5, 3], [0, 0], _batch([8, 2], [((1, 3),), ()]), [0, 4]) is None


def _simulate(num_scheduled, num_computed, ks, ranges, group_starts):
    """Token by token: what each group sees and where each kept token sits in its KV."""
    rows = []  # (request, position)
    for r, (n, c) in enumerate(zip(num_scheduled, num_computed, strict=True)):
        rows += [(r, c + i) for i in range(n)]

    def is_vision(r, p):
        return any(a <= p < b for a, b in ranges[r])

    groups = {}
    for s in group_starts:
        alive = [i for i, (r, p) in enumerate(rows) if not (is_vision(r, p) and ks[r] <= s)]
        compacted = [bool(ranges[r]) and ks[r] <= s for r in range(len(ks))]
        logical = [
            p - sum(is_vision(r, q) for q in range(p)) if compacted[r] else p
            for r, p in (rows[i] for i in alive)
        ]
        seq_lens = [
            c + n - (sum(is_vision(r, q) for q in range(c + n)) if compacted[r] else 0)
            for r, (n, c) in enumerate(zip(num_scheduled, num_computed, strict=True))
        ]
        groups[s] = (alive, logical, seq_lens)
    return rows, groups


@pytest.mark.parametrize("seed", range(200))
def test_random_batches_match_simulation(seed):
    rng = np.random.default_rng(seed)
    num_layers, group_starts = 8, [0, 2, 4, 6]
    num_reqs = int(rng.integers(1, 5))
    ranges, ks, num_computed, num_scheduled = [], [], [], []
    for _ in range(num_reqs):
        length = int(rng.integers(3, 40))
        images = []
        if rng.random() < 0.7:  # up to two images at random offsets
            size = min(length, int(rng.integers(1, 3)) * 2)
            for a in sorted(rng.choice(length, size=size, replace=False))[::2]:
                images.append((int(a), int(min(length, a + rng.integers(1, 8)))))
            images = [r for i, r in enumerate(images) if i == 0 or r[0] >= images[i - 1][1]]
        ranges.append(tuple(images))
        ks.append(int(rng.choice([2, 4, 6, num_layers])))
        c = int(rng.integers(0, length))
        if seed % 4 == 0:  # every request past its images: the decode (bulk) path
            c = max(c, images[-1][1] if images else 0)
        num_computed.append(c)
        num_scheduled.append(int(rng.integers(1, length - c + 2)))
    plan = plan_step(num_scheduled, num_computed, _batch(ks, ranges), group_starts)
    rows, expected = _simulate(num_scheduled, num_computed, ks, ranges, group_starts)
    if plan is None:
        assert all(e[0] == list(range(len(rows))) for e in expected.values())
        return
    for s, (alive, logical, seq_lens) in expected.items():
        layout = plan.groups.get(s)
        if layout is None:  # stock layout: every row, original positions
            assert alive == list(range(len(rows)))
            continue
        assert layout.alive_index.tolist() == alive
        assert layout.logical_positions.tolist() == logical
        assert layout.seq_lens.tolist() == seq_lens
        counts = np.diff(layout.query_start_loc)
        assert counts.tolist() == [sum(rows[i][0] == r for i in alive) for r in range(num_reqs)]
    # The model's rows after each withdrawal are exactly what the next group sees.
    current = np.arange(len(rows))
    for w in plan.withdrawals:
        current = current[w.keep_index]
        assert current.tolist() == expected[w.layer][0]
    assert plan.out_index.tolist() == current.tolist()


def test_decode_step_compacts_without_vision_rows():
    # Decode: one token each, past the images (the bulk path). A: K=2, image at 1-4,
    # position 9; B: K=8, image at 0-2, position 5; C: no image, position 3.
    plan = plan_step(
        [1, 1, 1], [9, 5, 3], _batch([2, 8, 2], [((1, 5),), ((0, 3),), ()]), [0, 2, 4, 6]
    )
    assert plan.withdrawals == []  # nothing is withdrawn in a decode step ...
    g = plan.groups[2]  # ... but A's deep groups index its compacted KV
    assert g.logical_positions.tolist() == [9 - 4, 5, 3]
    assert g.positions.tolist() == [9, 5, 3]
    assert g.seq_lens.tolist() == [10 - 4, 6, 4]
    assert g.query_start_loc.tolist() == [0, 1, 2, 3]


def _feature(modality: str, offset: int, length: int, is_embed=None):
    from types import SimpleNamespace

    from vllm.multimodal.inputs import PlaceholderRange

    position = PlaceholderRange(offset=offset, length=length, is_embed=is_embed)
    return SimpleNamespace(modality=modality, mm_position=position)


def test_vision_ranges_cover_images_and_videos():
    from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

    features = [
        _feature("video", 40, 785),  # OneVision: 4 frames x 196 + the video's newline
        _feature("image", 3, 30),
        _feature("audio", 900, 10),  # not vision: never withdrawn
        _feature("video", 825, 5),  # right after the first video: adjacent ranges
    ]
    ranges = vision_ranges(features)
    assert ranges == ((3, 33), (40, 825), (825, 830))
    assert kept_tokens(ranges, 1000) == 1000 - 30 - 785 - 5
    assert vision_ranges(None) == () and vision_ranges([]) == ()


def test_vision_ranges_keep_non_embed_positions_as_text():
    """A placeholder with an is_embed mask (e.g. [IMG_BREAK] / [IMG_END] rows inside a
    Pixtral-style image range) withdraws only its embed runs."""
    import torch

    from vtw_vllm.vision_ranges import vision_ranges

    mask = torch.tensor([True, True, False, True, True, False])  # 2 rows of 2 + break/end
    assert vision_ranges([_feature("image", 10, 6, mask)]) == ((10, 12), (13, 15))
    none = torch.zeros(4, dtype=torch.bool)
    assert vision_ranges([_feature("image", 0, 4, none)]) == ()


def test_request_vision_kept_matches_kept_tokens():
    from vtw_vllm.vision_ranges import kept_tokens

    for ranges in [(), ((3, 33),), ((3, 33), (40, 825), (825, 830))]:
        info = RequestVision(4, ranges)
        assert [info.kept(n) for n in range(900)] == [kept_tokens(ranges, n) for n in range(900)]
        assert info.withdrawn_below(4) == bool(ranges) and not info.withdrawn_below(3)
