"""bot.queue.fairqueue: band order, start-time fair queuing, aging, caps, front pushes, batching."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bot.queue.fairqueue import FairQueue, QueueEntry, QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


_ids = itertools.count()


def job(owner: int, *, band: int = 1, cost: float = 1.0, key: str = "") -> QueueEntry:
    return QueueEntry(job_id=f"{owner}-{next(_ids)}", owner_id=owner, cost=cost, band=band, payload=key)


def drain(q: FairQueue) -> list[QueueEntry]:
    out = []
    while (entry := q.pop()) is not None:
        out.append(entry)
    return out


# ---------------------------------------------------------------------------- examples
def test_lower_band_runs_first() -> None:
    q = FairQueue()
    late = [job(1, band=1), job(2, band=1)]
    early = [job(3, band=0), job(3, band=0)]
    for entry in late + early:
        q.push(entry)
    assert [e.band for e in drain(q)] == [0, 0, 1, 1]


def test_bursts_interleave_round_robin() -> None:
    q = FairQueue()
    a = [job(1) for _ in range(3)]
    b = [job(2) for _ in range(3)]
    c = [job(3)]
    for entry in a + b + c:
        q.push(entry)
    assert [e.owner_id for e in drain(q)] == [1, 2, 3, 1, 2, 1, 2]


def test_cost_weighting_serves_equal_units() -> None:
    q = FairQueue()
    for _ in range(4):
        q.push(job(1, cost=2.0))
    for _ in range(8):
        q.push(job(2, cost=1.0))
    order = drain(q)
    served: Counter[int] = Counter()
    for entry in order[:6]:
        served[entry.owner_id] += entry.cost
    assert served[1] == served[2] == 4.0  # six pops in, both users got 4 units


def test_weight_gives_more_share() -> None:
    q = FairQueue()
    for _ in range(6):
        q.push(QueueEntry(job_id=f"h{next(_ids)}", owner_id=1, cost=1.0, weight=2.0))
        q.push(QueueEntry(job_id=f"l{next(_ids)}", owner_id=2, cost=1.0))
    first_six = Counter(e.owner_id for e in drain(q)[:6])
    assert first_six == {1: 4, 2: 2}


def test_caps_raise_with_reasons() -> None:
    q = FairQueue(per_user_cap=2, global_cap=3)
    q.push(job(1))
    q.push(job(1))
    with pytest.raises(QueueFull) as exc:
        q.push(job(1))
    assert exc.value.reason == "user_cap" and exc.value.limit == 2
    assert "2 jobs waiting" in str(exc.value)
    q.push(job(2))
    with pytest.raises(QueueFull) as exc:
        q.push(job(3))
    assert exc.value.reason == "global_cap" and "queue is full" in str(exc.value)
    q.push(job(3), enforce_caps=False)  # re-queued work is never refused
    assert len(q) == 4
    with pytest.raises(QueueFull):
        q.check(4)
    q2 = FairQueue(per_user_cap=2)
    q2.push(job(1))
    with pytest.raises(QueueFull):
        q2.check(1, extra_user=1)  # e.g. one running job counted by the caller


def test_duplicate_and_invalid_entries_are_refused() -> None:
    q = FairQueue()
    entry = job(1)
    q.push(entry)
    with pytest.raises(ValueError):
        q.push(entry)
    with pytest.raises(ValueError):
        q.push(QueueEntry(job_id="neg", owner_id=1, cost=-1.0))
    with pytest.raises(ValueError):
        q.push(QueueEntry(job_id="nan", owner_id=1, cost=math.nan))


def test_remove_gives_virtual_time_back() -> None:
    q = FairQueue()
    a1, a2, a3 = job(1), job(1), job(1)
    b1 = job(2)
    for entry in (a1, a2, a3, b1):
        q.push(entry)
    assert q.remove(a2.job_id) is a2
    assert q.remove(a2.job_id) is None
    b2, a4, b3 = job(2), job(1), job(2)
    for entry in (b2, a4, b3):
        q.push(entry)
    # A's later jobs took the cancelled one's place: A is not behind B for a job it never ran.
    expected = [a1, b1, a3, b2, a4, b3]
    assert [e.job_id for e in drain(q)] == [e.job_id for e in expected]


def test_position_snapshot_len_counts() -> None:
    q = FairQueue()
    entries = [job(1), job(1), job(2), job(3, band=0)]
    for entry in entries:
        q.push(entry)
    snap = q.snapshot()
    assert [q.position(e.job_id) for e in snap] == [1, 2, 3, 4]
    assert snap[0].owner_id == 3
    assert q.position("nope") is None
    assert len(q) == 4 and entries[0].job_id in q
    assert q.user_counts() == {1: 2, 2: 1, 3: 1} and q.count_for(1) == 2 and q.count_for(9) == 0
    assert q.depth_by_band() == {0: 1, 1: 3}
    assert [e for e, _ in q.ranked()] == snap
    assert q.pop() is snap[0]
    assert q.user_counts() == {1: 2, 2: 1}


def test_front_push_goes_ahead_of_its_band_only() -> None:
    q = FairQueue()
    mod = job(9, band=0)
    a1, a2, b1 = job(1), job(1), job(2)
    for entry in (a1, a2, b1):
        q.push(entry)
    assert q.pop() is a1
    q.push(mod)
    q.push(a1, front=True)
    assert [e.job_id for e in drain(q)] == [mod.job_id, a1.job_id, b1.job_id, a2.job_id]


def test_aging_promotes_one_band_per_period() -> None:
    clock = Clock()
    q = FairQueue(aging_seconds=300, clock=clock)
    old = job(1, band=2)
    q.push(old)
    clock.now = 100
    for _ in range(3):
        q.push(job(2, band=1))
    assert q.position(old.job_id) == 4 and q.effective_band(old.job_id) == 2
    clock.now = 301
    assert q.effective_band(old.job_id) == 1
    assert q.position(old.job_id) <= 2  # now competes fairly inside band 1, as a new arrival
    clock.now = 601
    assert q.effective_band(old.job_id) == 0
    assert q.depth_by_band() == {0: 4}  # the others waited 501 s: promoted once too
    assert q.pop() is old


def test_recovered_entry_keeps_its_age() -> None:
    clock = Clock()
    clock.now = 1000
    q = FairQueue(aging_seconds=300, clock=clock)
    q.push(job(2, band=0))
    waited = QueueEntry(job_id="waited", owner_id=1, cost=1, band=1, enqueued_at=1000 - 301)
    q.push(waited)
    assert q.effective_band("waited") == 0


def test_aged_job_is_not_starved_by_a_steady_stream() -> None:
    clock = Clock()
    q = FairQueue(aging_seconds=10, clock=clock)
    low = job(1, band=1)
    q.push(low)
    for _ in range(3):
        q.push(job(2, band=0))
    pops_after_aging = None
    for tick in range(200):
        clock.now = tick
        q.push(job(2, band=0))  # one new moderator job per pop, forever
        if q.pop() is low:
            pops_after_aging = tick - 10
            break
    assert pops_after_aging is not None and pops_after_aging <= 5


def test_pop_batch_rule() -> None:
    q = FairQueue()
    a1, a2, a3 = job(1, key="sq"), job(1, key="sq"), job(1, key="sq")
    b1 = job(2, key="wide")
    c1 = job(3, key="sq")
    for entry in (a1, a2, a3, b1, c1):
        q.push(entry)
    # order: a1(0) b1(0) c1(0) a2(1) a3(2). b1 breaks contiguity; a2 is the head's owner within one
    # quantum (start 1 <= 0 + 1); c1 is another user's job behind b1: not pulled ahead; a3 too far.
    batch = q.pop_batch(4, key=lambda e: e.payload)
    assert [e.job_id for e in batch] == [a1.job_id, a2.job_id]
    assert [e.job_id for e in drain(q)] == [b1.job_id, c1.job_id, a3.job_id]


def test_pop_batch_takes_contiguous_jobs_and_stays_in_band() -> None:
    q = FairQueue()
    m = job(9, band=0, key="k")
    rest = [job(i, key="k") for i in range(1, 4)]
    for entry in [m, *rest]:
        q.push(entry)
    assert q.pop_batch(4, key=lambda e: e.payload) == [m]
    assert q.pop_batch(2, key=lambda e: e.payload) == rest[:2]
    assert q.pop_batch(0, key=lambda e: e.payload) == []
    assert q.pop_batch(5, key=lambda e: e.payload) == rest[2:]
    assert q.pop_batch(5, key=lambda e: e.payload) == [] and q.pop() is None


# ---------------------------------------------------------------------------- servers
def on(guild: int | None, owner: int, *, band: int = 1, cost: float = 1.0) -> QueueEntry:
    return QueueEntry(job_id=f"{guild}:{owner}-{next(_ids)}", owner_id=owner, cost=cost, band=band, guild_id=guild)


def test_servers_share_fairly_whatever_their_bands_and_members() -> None:
    """A server whose moderators (band 0, free of quota) flood the queue, or which has many
    members, still gets only its share: the other server's member is served every other job."""
    q = FairQueue()
    flood = [on(1, owner, band=0) for owner in range(10, 20) for _ in range(2)]
    quiet = [on(2, 99) for _ in range(3)]
    for entry in flood + quiet:
        q.push(entry)
    servers = [e.guild_id for e in drain(q)]
    assert servers[:6] == [1, 2, 1, 2, 1, 2]
    assert servers[6:] == [1] * 17


def test_a_paused_server_waits_while_others_run() -> None:
    q = FairQueue()
    paused, running = [on(1, 1), on(1, 2)], [on(2, 3), on(2, 3)]
    for entry in paused + running:
        q.push(entry)
    q.pause_server(1)
    assert [e.guild_id for e, _ in q.ranked()] == [2, 2, 1, 1]  # paused jobs are ranked last
    assert [e.job_id for e in drain(q)] == [e.job_id for e in running]
    assert len(q) == 2 and q.pop_batch(4, key=lambda e: 0) == []
    q.resume_server(1)
    assert [e.job_id for e in drain(q)] == [e.job_id for e in paused]


def test_dms_count_as_one_server() -> None:
    q = FairQueue()
    for entry in [on(None, 1), on(None, 2), on(None, 3), on(5, 4), on(5, 4)]:
        q.push(entry)
    assert [e.guild_id for e in drain(q)] == [None, 5, None, 5, None]


@given(
    bursts_per_server=st.lists(
        st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=2, max_size=8), min_size=2, max_size=4
    )
)
def test_server_service_bound(bursts_per_server: list[list[float]]) -> None:
    """While two servers both have work queued, the units served to them differ by at most the
    larger of their biggest job costs, whatever bands their jobs are in."""
    q = FairQueue()
    for server, costs in enumerate(bursts_per_server):
        for index, cost in enumerate(costs):
            q.push(on(server, 100 * server + index % 3, band=index % 2, cost=cost))
    biggest = {server: max(costs) for server, costs in enumerate(bursts_per_server)}
    served: Counter[int | None] = Counter()
    while (entry := q.pop()) is not None:
        served[entry.guild_id] += entry.cost
        backlogged = {e.guild_id for e in q.snapshot()}
        for a, b in itertools.combinations(sorted(backlogged), 2):  # type: ignore[type-var]
            assert abs(served[a] - served[b]) <= max(biggest[a], biggest[b]) + 1e-9  # type: ignore[index]


# ---------------------------------------------------------------------------- properties
bursts = st.lists(
    st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]), min_size=3, max_size=8),
    min_size=2,
    max_size=6,
)


@given(bursts, st.randoms(use_true_random=False))
def test_every_first_job_before_any_third(costs_per_user: list[list[float]], rnd) -> None:
    q = FairQueue()
    # All users submit their burst before anything runs, in a random interleaving
    # (each user's own jobs stay in their order).
    left = {user: list(enumerate(costs)) for user, costs in enumerate(costs_per_user)}
    while left:
        user = rnd.choice(sorted(left))
        index, cost = left[user].pop(0)
        q.push(QueueEntry(job_id=f"{user}/{index}", owner_id=user, cost=cost))
        if not left[user]:
            del left[user]
    started = [int(e.job_id.split("/")[1]) for e in drain(q)]
    last_first = max(i for i, n in enumerate(started) if n == 0)
    first_third = min(i for i, n in enumerate(started) if n == 2)
    assert last_first < first_third


@given(bursts)
def test_sfq_service_bound(costs_per_user: list[list[float]]) -> None:
    """While two users both have work queued, the units served to them differ by at most the
    larger of their biggest job costs."""
    q = FairQueue()
    for user, costs in enumerate(costs_per_user):
        for index, cost in enumerate(costs):
            q.push(QueueEntry(job_id=f"{user}/{index}", owner_id=user, cost=cost))
    biggest = {user: max(costs) for user, costs in enumerate(costs_per_user)}
    served: Counter[int] = Counter()
    while (entry := q.pop()) is not None:
        served[entry.owner_id] += entry.cost
        backlogged = list(q.user_counts())
        for a, b in itertools.combinations(backlogged, 2):
            assert abs(served[a] - served[b]) <= max(biggest[a], biggest[b]) + 1e-9


@given(bursts, st.integers(1, 4), st.randoms(use_true_random=False))
def test_sfq_service_bound_with_batches(costs_per_user: list[list[float]], max_n: int, rnd) -> None:
    """The fairness property with batching on: drained by ``pop_batch`` (two shapes, at random),
    two backlogged users' served units differ by at most the SFQ bound plus one quantum (the
    largest job queued): what a batch may pull forward of its head's owner."""
    q = FairQueue()
    for user, costs in enumerate(costs_per_user):
        for index, cost in enumerate(costs):
            q.push(QueueEntry(job_id=f"{user}/{index}", owner_id=user, cost=cost, payload=rnd.choice("xy")))
    biggest = {user: max(costs) for user, costs in enumerate(costs_per_user)}
    quantum = max(biggest.values())
    served: Counter[int] = Counter()
    while batch := q.pop_batch(max_n, key=lambda e: e.payload):
        for entry in batch:
            served[entry.owner_id] += entry.cost
        for a, b in itertools.combinations(list(q.user_counts()), 2):
            assert abs(served[a] - served[b]) <= max(biggest[a], biggest[b]) + quantum + 1e-9


def test_pop_batch_sizes_add_up_to_the_limit_and_none_never_matches() -> None:
    q = FairQueue()
    # small1 would not fit after big; small2, the head's owner's next job, does (rule 2).
    big, small1, small2, alone = job(1, key="k"), job(2, key="k"), job(1, key="k"), job(4)
    for entry, size in ((big, 3), (small1, 2), (small2, 1)):
        entry.size = size
        q.push(entry)
    q.push(alone)
    sizes = lambda e: e.size  # noqa: E731
    assert q.pop_batch(4, key=lambda e: e.payload, size=sizes) == [big, small2]  # 3 + 1
    q2 = FairQueue()
    none1, none2 = job(1, key=""), job(2, key="")
    for entry in (none1, none2):
        q2.push(entry)
    assert q2.pop_batch(4, key=lambda e: None) == [none1]  # no shape: alone


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from("xy")),
        min_size=1,
        max_size=25,
    ),
    st.integers(1, 4),
)
def test_pop_batch_never_jumps_other_users(jobs, max_n: int) -> None:
    q = FairQueue()
    for owner, band, cost, key in jobs:
        q.push(job(owner, band=band, cost=cost, key=key))
    while len(q):
        before = q.snapshot()
        batch = q.pop_batch(max_n, key=lambda e: e.payload)
        assert 1 <= len(batch) <= max_n and batch[0] is before[0]
        assert {e.payload for e in batch} == {batch[0].payload}
        assert {e.band for e in batch} == {batch[0].band}
        # A job of another user is only taken when everything before it was taken too.
        taken = {e.job_id for e in batch}
        for entry in batch[1:]:
            if entry.owner_id != batch[0].owner_id:
                ahead = before[: before.index(entry)]
                assert all(e.job_id in taken for e in ahead)
        # The jobs left keep their relative order.
        assert q.snapshot() == [e for e in before if e.job_id not in taken]


class FairQueueMachine(RuleBasedStateMachine):
    """Random pushes, pops, removals and clock advances against a plain model."""

    AGING = 50.0

    @initialize(user_cap=st.integers(1, 4), global_cap=st.integers(1, 12))
    def setup(self, user_cap: int, global_cap: int) -> None:
        self.clock = Clock()
        self.q = FairQueue(per_user_cap=user_cap, global_cap=global_cap, aging_seconds=self.AGING, clock=self.clock)
        self.user_cap, self.global_cap = user_cap, global_cap
        self.model: dict[str, tuple[int, int, float]] = {}  # job id -> (owner, band, pushed at)
        self.out: Counter[str] = Counter()  # popped or removed
        self.pushed = 0
        self.refused = 0

    def effective(self, job_id: str) -> int:
        _, band, at = self.model[job_id]
        return max(0, band - int((self.clock.now - at) // self.AGING))

    @rule(owner=st.integers(0, 4), band=st.integers(0, 2), cost=st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    def push(self, owner: int, band: int, cost: float) -> None:
        entry = QueueEntry(job_id=f"j{self.pushed}", owner_id=owner, cost=cost, band=band)
        self.pushed += 1
        mine = sum(1 for o, _, _ in self.model.values() if o == owner)
        should_refuse = mine >= self.user_cap or len(self.model) >= self.global_cap
        try:
            position = self.q.push(entry)
        except QueueFull as exc:
            assert should_refuse
            self.refused += 1
            assert exc.reason == ("user_cap" if mine >= self.user_cap else "global_cap")
            return
        assert not should_refuse
        assert 1 <= position <= len(self.model) + 1
        self.model[entry.job_id] = (owner, band, self.clock.now)

    @rule()
    def pop(self) -> None:
        expected_head = self.q.snapshot()[:1]
        entry = self.q.pop()
        if not self.model:
            assert entry is None
            return
        assert entry is not None and [entry] == expected_head
        band = self.effective(entry.job_id)
        assert all(band <= self.effective(other) for other in self.model)  # band order, with aging
        del self.model[entry.job_id]
        self.out[entry.job_id] += 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        assert self.q.remove(job_id) is not None
        del self.model[job_id]
        self.out[job_id] += 1

    @rule(seconds=st.sampled_from([1.0, 20.0, 60.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def consistent(self) -> None:
        assert len(self.q) == len(self.model)
        assert self.q.user_counts() == dict(Counter(o for o, _, _ in self.model.values()))
        snap = self.q.snapshot()
        assert {e.job_id for e in snap} == set(self.model)
        assert [self.q.position(e.job_id) for e in snap] == list(range(1, len(snap) + 1))
        assert [band for _, band in self.q.ranked()] == sorted(band for _, band in self.q.ranked())
        # Aging is applied exactly when due, and the kept pop order is what a fresh sort gives.
        assert {e.job_id: band for e, band in self.q.ranked()} == {j: self.effective(j) for j in self.model}
        assert snap == [item.entry for item in sorted(self.q._items.values(), key=lambda i: i.sort_key())]
        assert all(n == 1 for n in self.out.values())  # nothing popped or removed twice
        assert len(self.out) + len(self.model) + self.refused == self.pushed  # nothing lost


TestFairQueueMachine = FairQueueMachine.TestCase
TestFairQueueMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
