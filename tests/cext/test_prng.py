import numpy as np

from meshmerge.cext import drop_lanes, drop_threshold, random_u64, stream_key, uniform_f64

MASK = (1 << 64) - 1


def splitmix_reference(key: int, index: int) -> int:
    """Sequential SplitMix64 (Steele et al. 2014): state advances by gamma, then the mixer."""
    state = key
    z = 0
    for _ in range(index + 1):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z = z ^ (z >> 31)
    return z


def test_counter_form_matches_sequential_splitmix() -> None:
    key = 0x0123456789ABCDEF
    out = np.empty(50, dtype=np.uint64)
    random_u64(key, 0, out)
    assert [int(v) for v in out] == [splitmix_reference(key, i) for i in range(50)]


def test_known_splitmix_output_for_seed_zero() -> None:
    # First outputs of SplitMix64 seeded with 0 (widely published test vector).
    out = np.empty(2, dtype=np.uint64)
    random_u64(0, 0, out)
    assert [hex(int(v)) for v in out] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]


def test_draws_do_not_depend_on_chunking() -> None:
    key = stream_key(bytes(32), "layer.0.weight", 3)
    whole = np.empty(1000, dtype=np.uint64)
    random_u64(key, 0, whole)
    parts = []
    for lo in range(0, 1000, 37):
        part = np.empty(min(37, 1000 - lo), dtype=np.uint64)
        random_u64(key, lo, part)
        parts.append(part)
    assert np.array_equal(np.concatenate(parts), whole)


def test_stream_keys_separate_seed_name_and_stream() -> None:
    seed = bytes(range(32))
    keys = {
        stream_key(seed, "a", 0),
        stream_key(seed, "a", 1),
        stream_key(seed, "b", 0),
        stream_key(bytes(32), "a", 0),
    }
    assert len(keys) == 4
    assert stream_key(seed, "a", 0) == stream_key(seed, "a", 0)


def test_uniform_is_uniform_enough() -> None:
    u = np.empty(200_000, dtype=np.float64)
    uniform_f64(stream_key(bytes(32), "u", 0), 0, u)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 20_000) < 800)


def test_drop_threshold_is_exact() -> None:
    assert drop_threshold(0.0) == 0
    assert drop_threshold(1.0) == 1 << 16
    assert drop_threshold(0.5) == 1 << 15
    assert drop_threshold(0.1) == 6554


def test_drop_lanes_are_the_four_16_bit_lanes_of_each_draw() -> None:
    key = stream_key(bytes(32), "lanes", 1)
    draws = np.empty(10, dtype=np.uint64)
    random_u64(key, 0, draws)
    ref = [(int(draws[i // 4]) >> (16 * (i % 4))) & 0xFFFF for i in range(40)]
    lanes = np.empty(40, dtype=np.uint16)
    drop_lanes(key, 0, lanes)
    assert lanes.tolist() == ref
    tail = np.empty(13, dtype=np.uint16)
    drop_lanes(key, 27, tail)
    assert tail.tolist() == ref[27:]
