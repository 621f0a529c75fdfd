"""The whole-network search: decoder width, encoder depth and input size as dimensions, successive
halving on injected scores, and a large candidate losing to a small one under a tight profile."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from fedseg.search.halving import kendall_tau, planned_epochs, rung_sizes, successive_halving
from fedseg.search.hardware import HardwareBudget
from fedseg.search.measure import (
    SearchData,
    SearchSpec,
    build_architecture,
    measure_architecture,
    to_candidate,
)
from fedseg.search.profile import count_macs
from fedseg.search.rank import halving_notes, rank_candidates
from fedseg.search.select import select_backbone
from fedseg.search.space import search_space


def _arch(backbone: str = "tiny", *, scale: float = 1.0, depth: int | None = None, size=(64, 64)):
    space, skipped = search_space([backbone], decoder_scales=[scale], encoder_depths=[depth], image_sizes=[size])
    assert skipped == []
    return space[0]


def test_decoder_scale_changes_the_built_decoder_and_its_macs() -> None:
    # Prepare: tiny's registered decoder is 32-16-8
    full, quarter = _arch(scale=1.0), _arch(scale=0.25)
    x = torch.randn(1, 3, 64, 64)
    # Execute
    models = {a.decoder_channels: build_architecture(a, 3).eval() for a in (full, quarter)}
    # Assert: widths scaled (and kept >= 4), the decoder's convolutions really narrower, fewer MACs
    assert (full.decoder_channels, quarter.decoder_channels) == ((32, 16, 8), (8, 4, 4))
    for channels, model in models.items():
        last_conv = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        assert last_conv.out_channels == channels[-1]
        assert model(x).shape == (1, 3, 64, 64)
    assert count_macs(models[(8, 4, 4)], x) < 0.7 * count_macs(models[(32, 16, 8)], x)


def test_encoder_depth_drops_the_deepest_stages_and_their_decoder_widths() -> None:
    shallow = _arch("mobilenet_v2", scale=0.5, depth=4)
    assert (shallow.encoder_depth, shallow.decoder_channels) == (4, (64, 32, 16, 8))  # 128-64-32-16 halved
    model = build_architecture(shallow, 2).eval()
    assert len(model.encoder.out_channels) == 5  # input + 4 stages
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_space_names_show_only_the_varied_dimensions_and_say_what_it_left_out() -> None:
    space, skipped = search_space(["tiny", "mobilenet_v2"], decoder_scales=[1.0, 0.5], encoder_depths=[None, 4],
                                  image_sizes=[(96, 128)])
    names = [a.name for a in space]
    # tiny is registered at depth 3: depth 4 has no decoder widths; 96x128 is divisible by 2**5
    assert names == ["tiny dec1 d3", "tiny dec0.5 d3", "mobilenet_v2 dec1 d5", "mobilenet_v2 dec1 d4",
                     "mobilenet_v2 dec0.5 d5", "mobilenet_v2 dec0.5 d4"]
    assert skipped == ["tiny dec1 d4: encoder depth 4 > tiny's 3", "tiny dec0.5 d4: encoder depth 4 > tiny's 3"]
    one, _ = search_space(["tiny"], decoder_scales=[1.0], encoder_depths=[None], image_sizes=[(100, 64)])
    assert one == []  # 100 is not divisible by 2**3
    assert [a.name for a in search_space(["tiny"], decoder_scales=[1.0], encoder_depths=[None],
                                         image_sizes=[(64, 64)])[0]] == ["tiny"]  # as before the search grew


def test_bad_search_dimensions_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"search.decoder_scales=\[1.0, 0.0\]: every scale must be > 0"):
        SearchSpec(decoder_scales=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"search.encoder_depths=\[6\]: valid: null or 1 to 5"):
        SearchSpec(encoder_depths=(6,))
    with pytest.raises(ValueError, match="search.eta must be >= 2"):
        SearchSpec(eta=1)


def test_successive_halving_keeps_the_best_scoring_and_doubles_their_budget() -> None:
    # Prepare: injected scores; "c" is best at every budget, "a" improves with more epochs
    table = {"a": {1: 0.30, 2: 0.60, 4: 0.65}, "b": {1: 0.10}, "c": {1: 0.50, 2: 0.55, 4: 0.70}, "d": {1: 0.40, 2: 0.50},
             "e": {1: 0.20}}
    calls: list[tuple[str, int]] = []

    def score(name: str, epochs: int) -> float:
        calls.append((name, epochs))
        return table[name][epochs]

    # Execute
    rungs = successive_halving(list("abcde"), score, epochs=1, rungs=3, eta=2)
    # Assert: 5 -> ceil(5/2)=3 -> ceil(3/2)=2 entrants, budgets 1, 2, 4
    assert [(r.epochs, sorted(r.scores)) for r in rungs] == [(1, list("abcde")), (2, ["a", "c", "d"]),
                                                             (4, ["a", "c"])]
    assert rungs[0].promoted == ("c", "d", "a")
    assert rungs[1].promoted == ("a", "c")  # a overtakes c at 2 epochs; d (0.50) is dropped
    assert rungs[2].promoted == ("c", "a")  # the last rung: every entrant, best first
    assert len(calls) == 5 + 3 + 2
    assert planned_epochs(5, epochs=1, rungs=3, eta=2) == 5 * 1 + 3 * 2 + 2 * 4
    assert rung_sizes(1, rungs=3, eta=2) == [1]  # a single candidate trains once


def test_halving_ties_keep_the_given_order() -> None:
    rungs = successive_halving(["fast", "slow"], lambda n, e: 0.5004 if n == "slow" else 0.4996, epochs=1,
                               rungs=2, eta=2)
    assert rungs[0].promoted == ("fast",)  # equal at 3 decimals: the first listed (faster) goes on


def test_kendall_tau_on_hand_rankings() -> None:
    assert kendall_tau("abc", "abc") == 1.0
    assert kendall_tau("abc", "cba") == -1.0
    assert kendall_tau("abc", "acb") == pytest.approx(1 / 3)  # 2 of 3 pairs agree: (2 - 1) / 3
    assert kendall_tau("a", "a") is None


def _frames(count: int, size: int = 32) -> Subset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 3, size, size, generator=generator)
    y = torch.randint(0, 3, (count, size, size), generator=generator)
    return Subset(TensorDataset(x, y), list(range(count)))


def test_a_large_candidate_loses_under_a_tight_profile_however_accurate() -> None:
    # Prepare: tiny as registered (~0.11 M parameters, 0.4 MB) and with a 4x wider decoder (~1 MB+)
    frames = _frames(4)
    data = SearchData(frames, frames, 3, ("a", "b", "c"), (32, 32), torch.stack([frames[i][0] for i in range(2)]))
    spec = SearchSpec(int8=False, warmup=1, repeats=2, batch_size=2, train_epochs=1)
    (small, wide), _ = search_space(["tiny"], decoder_scales=[1.0, 4.0], encoder_depths=[None],
                                    image_sizes=[(32, 32)])
    budget = HardwareBudget("tight", model_mb=0.6, image_size=(32, 32))
    results = [measure_architecture(a, data, spec, budget, seed=0, threads=1) for a in (small, wide)]
    assert results[0].profile.size_mb < 0.6 < results[1].profile.size_mb
    assert results[0].profile.macs < results[1].profile.macs
    trained: list[str] = []

    def score(name: str, epochs: int, seed: int) -> tuple[float, float, float, float]:
        trained.append(name)
        return {"tiny dec1": 0.2}.get(name, 0.9), 0.5, 1.0, 0.0  # the wide one would be "more accurate"

    # Execute
    ranking = rank_candidates(results, budget, score, precision="fp32", dp=False, seed=0, epochs=1, rungs=2, eta=2)
    candidates = [to_candidate(r, precision="fp32", dp=False) for r in ranking.results]
    choice = select_backbone(candidates, budget)
    # Assert: the over-budget candidate is never trained and never chosen; the small one is
    assert trained == ["tiny dec1"] and ranking.finalists == ("tiny dec1",)
    assert choice.selected.name == "tiny dec1"
    assert choice.rejected["tiny dec4"] == [f"model_mb {results[1].profile.size_mb:.1f} > model_mb 0.6"]


def test_a_stability_seed_records_its_order_tau_and_scores_and_search_md_says_them() -> None:
    # Prepare: three decoder widths of tiny, all within a loose profile; under seed 1 the top two swap
    frames = _frames(4)
    data = SearchData(frames, frames, 3, ("a", "b", "c"), (32, 32), torch.stack([frames[i][0] for i in range(2)]))
    spec = SearchSpec(int8=False, warmup=1, repeats=2, batch_size=2, train_epochs=1)
    space, _ = search_space(["tiny"], decoder_scales=[0.5, 1.0, 2.0], encoder_depths=[None], image_sizes=[(32, 32)])
    budget = HardwareBudget("loose", image_size=(32, 32))
    results = [measure_architecture(a, data, spec, budget, seed=0, threads=1) for a in space]
    by_seed = {0: {"tiny dec0.5": 0.30, "tiny dec1": 0.20, "tiny dec2": 0.10},
               1: {"tiny dec0.5": 0.25, "tiny dec1": 0.27, "tiny dec2": 0.05}}

    def score(name: str, epochs: int, seed: int) -> tuple[float, float, float, float]:
        return by_seed[seed][name], 0.5, 1.0, 0.0

    # Execute
    ranking = rank_candidates(results, budget, score, precision="fp32", dp=False, seed=0, epochs=1, rungs=1, eta=2,
                              stability_seeds=[1])
    notes = halving_notes(ranking, frames=4, seed=0)
    # Assert: one of three pairs disagrees (tau 1/3), the seed's own scores are kept and stated
    again = ranking.stability[1]
    assert ranking.finalists == ("tiny dec0.5", "tiny dec1", "tiny dec2")
    assert again.order == ("tiny dec1", "tiny dec0.5", "tiny dec2") and again.kendall_tau == pytest.approx(1 / 3)
    assert again.scores == by_seed[1]
    assert notes[-1] == ("Stability: the last rung retrained with seed 1 (run seed 0) gives order (tiny dec1 0.270, "
                         "tiny dec0.5 0.250, tiny dec2 0.050); Kendall tau 0.33.")
