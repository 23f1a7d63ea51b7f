"""The GPU suite's run order (properties/conftest.py: longest_first) keeps every test and, under pytest-xdist's
`--dist load --maxschedchunk 1` (two tests handed to each worker at the start, then one per finished test),
ends no later than the plain longest-first sort, which starts some worker on two of the longest tests."""
import heapq

from hypothesis import given
from hypothesis import strategies as st

from properties.conftest import longest_first


def makespan(order, seconds, workers):
    """When the last test ends under xdist's load scheduling with --maxschedchunk 1: each worker holds the test
    it runs and one queued; a finished test starts the queued one and fetches the next pending."""
    pending, queues, events = list(order), [[] for _ in range(workers)], []
    for w in range(workers):
        queues[w] += [pending.pop(0) for _ in range(2) if pending]
        if queues[w]:
            heapq.heappush(events, (seconds[queues[w].pop(0)], w))
    end = 0.0
    while events:
        t, w = heapq.heappop(events)
        end = max(end, t)
        if pending:
            queues[w].append(pending.pop(0))
        if queues[w]:
            heapq.heappush(events, (t + seconds[queues[w].pop(0)], w))
    return end


@given(st.lists(st.floats(0.01, 400.0), min_size=1, max_size=300), st.integers(1, 16))
def test_longest_first_keeps_every_test_and_beats_plain_sort(durations, workers):
    """Every test once; the first `workers` pairs are (long, short); its makespan <= the plain sort's."""
    tests = list(range(len(durations)))
    order = longest_first(tests, lambda i: durations[i], workers)
    assert sorted(order) == tests
    plain = sorted(tests, key=lambda i: -durations[i])
    if workers >= 2 and len(tests) >= 4 * workers:
        assert [durations[i] for i in order[:2 * workers:2]] == [durations[i] for i in plain[:workers]]
        assert max(durations[i] for i in order[1:2 * workers:2]) <= min(durations[i] for i in plain[:workers])
    assert makespan(order, durations, workers) <= makespan(plain, durations, workers) + 1e-9
