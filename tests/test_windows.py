import pytest

from mswa.windows import ScheduleError, attended_pairs, make_schedule


def rows(schedule):
    return [list(layer) for layer in schedule.windows]


def repeat(row, times):
    return [list(row) for _ in range(times)]


EXPECTED_12x8_W128 = {
    "uniform": repeat([128] * 8, 12),
    "mswa": repeat([8, 8, 16, 16, 32, 32, 64, 64], 3)
    + repeat([16, 16, 32, 32, 64, 64, 128, 128], 3)
    + repeat([32, 32, 64, 64, 128, 128, 256, 256], 3)
    + repeat([64, 64, 128, 128, 256, 256, 512, 512], 3),
    "mswa_official": repeat([128, 128, 64, 64, 32, 32, 32, 32], 6)
    + repeat([256, 256, 128, 128, 64, 64, 64, 64], 3)
    + repeat([512, 512, 256, 256, 128, 128, 128, 128], 3),
    "mswa_h": repeat([32, 32, 64, 64, 128, 128, 256, 256], 12),
    "mswa_l": repeat([32] * 8, 3) + repeat([64] * 8, 3) + repeat([128] * 8, 3) + repeat([256] * 8, 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_12x8_W128))
def test_named_schedules_12_layers_8_heads(name):
    assert rows(make_schedule(name, w=128, n_layer=12, n_head=8)) == EXPECTED_12x8_W128[name]


def test_mswa_official_32_layers_32_heads():
    table = rows(make_schedule("mswa_official", w=1024, n_layer=32, n_head=32))
    groups = lambda a, b, c, d: [a] * 8 + [b] * 8 + [c] * 8 + [d] * 8  # noqa: E731
    assert table[:16] == repeat(groups(1024, 512, 256, 256), 16)
    assert table[16:24] == repeat(groups(2048, 1024, 512, 512), 8)
    assert table[24:] == repeat(groups(4096, 2048, 1024, 1024), 8)


def test_mean_window_ratios_match_design():
    assert make_schedule("mswa", w=128, n_layer=12, n_head=8).mean_window_over_w() == pytest.approx((15 / 16) ** 2)
    assert make_schedule("mswa_official", w=128, n_layer=12, n_head=8).mean_window_over_w() == pytest.approx(1.0)
    assert make_schedule("full", w=None, n_layer=2, n_head=2).mean_window_over_w() is None


def test_attended_pairs_counts_by_brute_force():
    for n in (1, 5, 17):
        for w in (None, 1, 3, 17, 40):
            brute = sum(1 for i in range(n) for j in range(n) if 0 <= i - j and (w is None or i - j < w))
            assert attended_pairs(w, n) == brute


def test_budget_relative_to_swa_and_full():
    budget = make_schedule("uniform", w=64, n_layer=2, n_head=4).budget(256)
    assert budget["pairs_vs_swa"] == 1.0
    assert budget["attended_pairs"] == 8 * attended_pairs(64, 256)
    assert budget["pairs_vs_full"] == pytest.approx(attended_pairs(64, 256) / attended_pairs(None, 256))
    full = make_schedule("full", w=None, n_layer=2, n_head=4).budget(256)
    assert full["pairs_vs_full"] == 1.0 and full["pairs_vs_swa"] is None


def test_ratios_generalise_to_any_group_count():
    table = rows(make_schedule("mswa", w=64, n_layer=2, n_head=8, head_ratios=[0.5, 1], layer_ratios=[1, 2]))
    assert table == [[32] * 4 + [64] * 4, [64] * 4 + [128] * 4]


def test_rounding_and_floor_at_one():
    table = rows(make_schedule("mswa", w=3, n_layer=4, n_head=4))
    assert min(min(r) for r in table) == 1
    assert table[3] == [2, 3, 6, 12]  # 3 * 2 * 0.25 = 1.5 rounds half up to 2


def test_custom_and_full_schedules():
    custom = make_schedule("custom", w=8, n_layer=2, n_head=2, windows=[[1, None], [8, 16]])
    assert rows(custom) == [[1, None], [8, 16]]
    assert "full" in custom.describe()
    assert rows(make_schedule("full", w=None, n_layer=1, n_head=3)) == [[None, None, None]]


def test_describe_is_a_table_with_budget():
    text = make_schedule("mswa", w=128, n_layer=4, n_head=4).describe(seq_len=1024)
    lines = text.splitlines()
    assert lines[1].split("|")[1].split() == ["h0", "h1", "h2", "h3"]
    assert lines[3].split("|")[1].split() == ["8", "16", "32", "64"]
    assert "x SWA(w)" in text and "mean window / w" in text


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="mswa", w=128, n_layer=12, n_head=6), ["head_ratios", "6 heads"]),
        (dict(name="mswa", w=128, n_layer=6, n_head=8), ["layer_ratios", "6 layers"]),
        (dict(name="uniform", w=0, n_layer=2, n_head=2), ["window=0"]),
        (dict(name="uniform", w=-4, n_layer=2, n_head=2), ["window=-4"]),
        (dict(name="mswa", w=8, n_layer=2, n_head=2, head_ratios=[]), ["head_ratios", "empty"]),
        (dict(name="mswa", w=8, n_layer=2, n_head=2, head_ratios=[1, -1]), ["head_ratios", "[1.0, -1.0]"]),
        (dict(name="mswa", w=8, n_layer=2, n_head=4, layer_ratios=[0, 1]), ["layer_ratios", "non-positive"]),
        (dict(name="swirly", w=8, n_layer=2, n_head=2), ["'swirly'", "mswa_official"]),
        (dict(name="custom", w=8, n_layer=2, n_head=2), ["windows", "required"]),
        (dict(name="custom", w=8, n_layer=2, n_head=2, windows=[[1, 2]]), ["2 layers x 2 heads"]),
        (dict(name="custom", w=8, n_layer=1, n_head=2, windows=[[1, 2, 3]]), ["1 layers x 2 heads"]),
        (dict(name="custom", w=8, n_layer=1, n_head=2, windows=[[0, 2]]), ["windows[0][0]=0"]),
    ],
)
def test_bad_schedules_raise_named_errors(kwargs, words):
    with pytest.raises(ScheduleError) as err:
        make_schedule(kwargs.pop("name"), **kwargs)
    for word in words:
        assert word in str(err.value)
