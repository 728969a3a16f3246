"""Hypothesis strategies shared by the tests that compare a GCRA script with the Python oracle."""

from hypothesis import strategies as st

#: Emission interval (µs) and bucket capacity.
intervals = st.integers(1, 500_000)
bursts = st.integers(1, 10)


def steps(max_size: int) -> st.SearchStrategy:
    """Requests as (µs since the previous one, cost, reserve µs: -1 never / 0 / 250 ms)."""
    return st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 3), st.sampled_from([-1, 0, 250_000])),
                    min_size=1, max_size=max_size)
