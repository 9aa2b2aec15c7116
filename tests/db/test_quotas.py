"""QuotaStore on both backends: window edges, precedence, grants, refunds, reset, concurrency."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.ledger import SIGN
from db.quotas import LedgerStateError, QuotaStore, Refusal, Reservation, UnknownReservation
from db.session import Database
from tests.db.conftest import FakeClock

G, U, V = 1000, 42, 43
WINDOW = 3600.0


@pytest.fixture
def quotas(db: Database, clock: FakeClock) -> QuotaStore:
    return QuotaStore(db, window_seconds=WINDOW, default_limit=10, clock=clock)


async def reserve(q: QuotaStore, units: float, job: str, user: int = U, roles: tuple[int, ...] = ()) -> object:
    return await q.reserve(G, user, roles, units, job)


async def test_reserve_and_status(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    r = await reserve(quotas, 4, "J1")
    assert isinstance(r, Reservation) and r.ok
    assert (r.limit, r.used, r.remaining) == (10, 4, 6)
    st = await quotas.status(G, U)
    assert (st.limit, st.used, st.remaining, st.source) == (10, 4, 6, "default")
    assert st.resets_at == t0 + timedelta(seconds=WINDOW)


async def test_window_edges(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    assert isinstance(await reserve(quotas, 10, "J1"), Reservation)
    clock.set(t0 + timedelta(seconds=WINDOW) - timedelta(microseconds=1))  # still inside
    refused = await reserve(quotas, 1, "J2")
    assert isinstance(refused, Refusal) and not refused.ok
    assert refused.reason == "over_quota"
    assert (refused.limit, refused.used, refused.remaining) == (10, 10, 0)
    assert refused.retry_at == t0 + timedelta(seconds=WINDOW)
    assert (await quotas.status(G, U)).used == 10
    clock.set(t0 + timedelta(seconds=WINDOW))  # exactly one window later: the charge is out
    assert (await quotas.status(G, U)).used == 0
    assert (await quotas.status(G, U)).resets_at is None
    assert isinstance(await reserve(quotas, 10, "J3"), Reservation)


async def test_refusal_charges_nothing_and_says_when(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    await reserve(quotas, 6, "A")
    clock.advance(600)
    await reserve(quotas, 4, "B")
    clock.advance(600)
    small = await reserve(quotas, 5, "C")
    assert isinstance(small, Refusal)
    assert small.retry_at == t0 + timedelta(seconds=WINDOW)  # when A's 6 units leave
    whole = await reserve(quotas, 10, "D")
    assert isinstance(whole, Refusal)
    assert whole.retry_at == t0 + timedelta(seconds=WINDOW + 600)  # when B leaves too
    never = await reserve(quotas, 11, "E")
    assert isinstance(never, Refusal) and never.retry_at is None
    assert (await quotas.status(G, U)).used == 10
    assert [e.kind for e in await quotas.ledger(G, U)] == ["reserve", "reserve"]


async def test_limit_precedence(quotas: QuotaStore) -> None:
    r1, r2, r3 = 501, 502, 503
    assert await quotas.effective_limit(G, U, [r1, r2]) == 10  # configured default
    await quotas.set_default_limit(G, 5)
    assert (await quotas.status(G, U, [r1, r2])).source == "guild"
    assert await quotas.effective_limit(G, U, [r1, r2]) == 5
    await quotas.set_role_limit(G, r1, 3)
    await quotas.set_role_limit(G, r2, 8)
    await quotas.set_role_limit(G, r3, 100)  # the user does not have this role
    assert await quotas.effective_limit(G, U, [r1, r2]) == 8  # highest role limit wins
    assert await quotas.effective_limit(G, U, [r1]) == 3  # a role limit may be below the default
    assert await quotas.effective_limit(G, U, []) == 5
    assert await quotas.role_limits(G) == {r1: 3, r2: 8, r3: 100}
    await quotas.set_user_limit(G, U, 2)
    assert await quotas.effective_limit(G, U, [r1, r2]) == 2  # override beats roles
    assert await quotas.user_limit(G, U) == 2
    assert await quotas.effective_limit(G, V, [r1, r2]) == 8  # only that user
    assert await quotas.effective_limit(G, U, [r1, r2], exempt=True) is None
    await quotas.set_user_limit(G, U, None)
    assert await quotas.effective_limit(G, U, [r1, r2]) == 8
    await quotas.set_role_limit(G, r2, None)
    assert await quotas.effective_limit(G, U, [r1, r2]) == 3
    await quotas.set_default_limit(G, None)
    assert await quotas.effective_limit(G, U, []) == 10
    assert await quotas.effective_limit(G + 1, U, []) == 10  # other guilds untouched


async def test_role_limit_applies_to_reserve(quotas: QuotaStore) -> None:
    await quotas.set_role_limit(G, 7, 2)
    assert isinstance(await quotas.reserve(G, U, [7], 2, "A"), Reservation)
    refused = await quotas.reserve(G, U, [7], 1, "B")
    assert isinstance(refused, Refusal) and refused.limit == 2


async def test_limit_zero_blocks_even_with_grants(quotas: QuotaStore) -> None:
    await quotas.set_user_limit(G, U, 0)
    await quotas.grant(G, U, 5, actor_id=9)
    refused = await reserve(quotas, 1, "A")
    assert isinstance(refused, Refusal)
    assert refused.reason == "blocked" and refused.retry_at is None and refused.remaining == 0
    assert (await quotas.status(G, U)).remaining == 0
    await quotas.set_default_limit(G, 0)
    refused_v = await reserve(quotas, 0.5, "B", user=V)
    assert isinstance(refused_v, Refusal) and refused_v.reason == "blocked"


async def test_unlimited_and_exempt(db: Database, clock: FakeClock) -> None:
    q = QuotaStore(db, window_seconds=WINDOW, default_limit=None, clock=clock)
    r = await q.reserve(G, U, [], 1000, "A")
    assert isinstance(r, Reservation) and r.limit is None and r.remaining is None
    q10 = QuotaStore(db, window_seconds=WINDOW, default_limit=1, clock=clock)
    assert isinstance(await q10.reserve(G, V, [], 50, "B", exempt=True), Reservation)
    st = await q10.status(G, V, exempt=True)
    assert (st.limit, st.used, st.remaining, st.source) == (None, 50, None, "exempt")
    assert await q10.refund("B")  # exempt charges are still recorded and refundable
    assert (await q10.status(G, V)).used == 0


async def test_grants_add_room_for_one_window(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    await reserve(quotas, 10, "A")
    clock.advance(100)
    await quotas.grant(G, U, 3, actor_id=9, note="event prize")
    st = await quotas.status(G, U)
    assert (st.used, st.granted, st.remaining) == (10, 3, 3)
    assert isinstance(await reserve(quotas, 3, "B"), Reservation)
    assert isinstance(await reserve(quotas, 0.5, "C"), Refusal)
    clock.set(t0 + timedelta(seconds=WINDOW))  # A expired; grant and B still count
    st = await quotas.status(G, U)
    assert (st.used, st.granted, st.remaining) == (3, 3, 10)
    clock.set(t0 + timedelta(seconds=WINDOW + 100))  # grant and B expire together
    st = await quotas.status(G, U)
    assert (st.used, st.granted, st.remaining) == (0, 0, 10)
    grant = [e for e in await quotas.ledger(G, U) if e.kind == "grant"]
    assert grant[0].actor_id == 9 and grant[0].note == "event prize"


async def test_refund_is_idempotent(quotas: QuotaStore) -> None:
    await reserve(quotas, 4, "A")
    assert await quotas.refund("A") is True
    assert await quotas.refund("A") is False
    assert (await quotas.status(G, U)).used == 0
    kinds = [e.kind for e in await quotas.ledger(G, U)]
    assert kinds == ["reserve", "refund"]
    with pytest.raises(UnknownReservation):
        await quotas.refund("NOPE")
    with pytest.raises(LedgerStateError):
        await quotas.commit("A")  # commit after refund


async def test_commit_then_refund_only_when_explicit(quotas: QuotaStore) -> None:
    await reserve(quotas, 4, "A")
    assert await quotas.commit("A") is True
    assert await quotas.commit("A") is False
    assert (await quotas.status(G, U)).used == 4  # committing does not change usage
    with pytest.raises(LedgerStateError):
        await quotas.refund("A")
    assert await quotas.refund("A", after_commit=True, actor_id=9) is True
    assert (await quotas.status(G, U)).used == 0
    with pytest.raises(UnknownReservation):
        await quotas.commit("NOPE")


async def test_refund_expires_with_its_charge(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    await reserve(quotas, 4, "A")
    clock.advance(3000)
    await quotas.refund("A")
    clock.set(t0 + timedelta(seconds=WINDOW + 1))  # the refund must not make usage negative
    st = await quotas.status(G, U)
    assert (st.used, st.remaining) == (0, 10)


async def test_reserve_is_idempotent_per_job(quotas: QuotaStore) -> None:
    first = await reserve(quotas, 4, "A")
    again = await reserve(quotas, 4, "A")
    assert isinstance(again, Reservation) and isinstance(first, Reservation)
    assert again.created_at == first.created_at
    assert (await quotas.status(G, U)).used == 4
    with pytest.raises(LedgerStateError):
        await reserve(quotas, 4, "A", user=V)


async def test_reset_clears_window_but_keeps_history(quotas: QuotaStore, clock: FakeClock) -> None:
    await reserve(quotas, 3, "A")
    clock.advance(10)
    await reserve(quotas, 4, "B")
    await quotas.grant(G, U, 2)
    assert await quotas.reset(G, U, actor_id=9) == 7
    st = await quotas.status(G, U)
    assert (st.used, st.granted, st.remaining, st.resets_at) == (0, 2, 12, None)
    # a refund of a job whose charge was reset gives nothing back twice
    assert await quotas.refund("A") is True
    assert (await quotas.status(G, U)).used == 0
    kinds = [e.kind for e in await quotas.ledger(G, U)]
    assert kinds.count("reserve") == 2 and kinds.count("reset") == 2 and kinds[-1] == "refund"
    assert await quotas.reset(G, U) == 0  # nothing left to clear


async def test_resets_at_follows_oldest_live_charge(quotas: QuotaStore, clock: FakeClock) -> None:
    t0 = clock.now
    await reserve(quotas, 1, "A")
    clock.advance(600)
    await reserve(quotas, 1, "B")
    assert (await quotas.status(G, U)).resets_at == t0 + timedelta(seconds=WINDOW)
    await quotas.refund("A")
    assert (await quotas.status(G, U)).resets_at == t0 + timedelta(seconds=WINDOW + 600)


async def test_fractional_units_are_exact_enough(quotas: QuotaStore) -> None:
    await quotas.set_user_limit(G, U, 0.3)
    for i in range(3):
        assert isinstance(await reserve(quotas, 0.1, f"F{i}"), Reservation)
    assert isinstance(await reserve(quotas, 0.1, "F3"), Refusal)
    assert (await quotas.status(G, U)).remaining == 0


async def test_dm_guild_is_separate(quotas: QuotaStore) -> None:
    r = await quotas.reserve(None, U, [], 10, "DM1")
    assert isinstance(r, Reservation)
    assert (await quotas.status(None, U)).used == 10
    assert (await quotas.status(G, U)).used == 0


async def test_bad_values_are_refused(quotas: QuotaStore) -> None:
    with pytest.raises(ValueError):
        await reserve(quotas, -1, "A")
    with pytest.raises(ValueError):
        await quotas.set_user_limit(G, U, -5)
    with pytest.raises(ValueError):
        await quotas.grant(G, U, float("nan"))


async def test_ledger_explains_balance(quotas: QuotaStore, clock: FakeClock) -> None:
    for i, units in enumerate([1, 2, 1.5, 0.5]):
        await reserve(quotas, units, f"L{i}")
        clock.advance(1)
    await quotas.refund("L1")
    await quotas.commit("L0")
    await quotas.grant(G, U, 1)
    st = await quotas.status(G, U)
    net = sum(SIGN[e.kind] * e.units for e in await quotas.ledger(G, U))
    assert net == pytest.approx(st.used - st.granted)
    assert st.used == 3 and st.granted == 1 and st.remaining == 8


# ------------------------------------------------------------------ concurrency
async def test_fifty_concurrent_reserves_accept_exactly_three(database_url: str, clock: FakeClock) -> None:
    """The guarantee: concurrent clicks never overspend. Two independent engines (as two bot
    processes would have), 50 simultaneous reservations, room for exactly 3."""
    dbs = [Database(database_url), Database(database_url)]
    for d in dbs:
        await d.connect()
    try:
        stores = [QuotaStore(d, window_seconds=WINDOW, default_limit=3, clock=clock) for d in dbs]
        results = await asyncio.gather(*(stores[i % 2].reserve(G, U, [], 1, f"C{i:02d}") for i in range(50)))
        accepted = [r for r in results if isinstance(r, Reservation)]
        refused = [r for r in results if isinstance(r, Refusal)]
        assert len(accepted) == 3 and len(refused) == 47
        st = await stores[0].status(G, U)
        assert (st.used, st.remaining) == (3, 0)
        reserves = [e for e in await stores[0].ledger(G, U) if e.kind == "reserve"]
        assert sorted(e.job_id for e in reserves) == sorted(r.job_id for r in accepted)
    finally:
        for d in dbs:
            await d.close()


async def test_two_users_concurrently_do_not_interfere(quotas: QuotaStore) -> None:
    await quotas.set_user_limit(G, V, 5)
    calls = [quotas.reserve(G, U, [], 1, f"U{i}") for i in range(20)]
    calls += [quotas.reserve(G, V, [], 1, f"V{i}") for i in range(20)]
    results = await asyncio.gather(*calls)
    per_user = {U: 0, V: 0}
    for r in results:
        if isinstance(r, Reservation):
            per_user[r.user_id] += 1
    assert per_user == {U: 10, V: 5}


async def test_concurrent_refunds_refund_once(quotas: QuotaStore) -> None:
    await reserve(quotas, 4, "A")
    results = await asyncio.gather(*(quotas.refund("A") for _ in range(10)))
    assert results.count(True) == 1
    assert [e.kind for e in await quotas.ledger(G, U)] == ["reserve", "refund"]


# ------------------------------------------------------------- model-based check
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
        st.tuples(st.just("refund"), st.integers(0, 20)),
        st.tuples(st.just("commit"), st.integers(0, 20)),
        st.tuples(st.just("grant"), st.sampled_from([1.0, 2.0])),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 600.0, 1800.0, 3599.0, 3600.0])),
    ),
    max_size=14,
)
_user_counter = itertools.count(10_000)


@pytest.mark.parametrize("backend", ["sqlite"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
async def test_matches_simple_model(quotas: QuotaStore, clock: FakeClock, ops: list[tuple[str, float]]) -> None:
    """Against a direct reading of the spec: used = live, unrefunded reservations in the
    window; a reservation is accepted iff used - granted + units <= limit."""
    user, limit, window = next(_user_counter), 5.0, timedelta(seconds=WINDOW)
    await quotas.set_user_limit(G, user, limit)
    jobs: list[dict[str, object]] = []  # {id, t, units, refunded, committed}
    grants: list[tuple[object, float]] = []

    def model_used() -> float:
        return sum(j["units"] for j in jobs if not j["refunded"] and j["t"] > clock.now - window)  # type: ignore[misc,operator]

    def model_granted() -> float:
        return sum(u for t, u in grants if t > clock.now - window)  # type: ignore[operator]

    for op, arg in ops:
        if op == "reserve":
            job_id = f"H{user}-{len(jobs)}"
            fits = model_used() - model_granted() + arg <= limit + 1e-9
            result = await quotas.reserve(G, user, [], arg, job_id)
            assert isinstance(result, Reservation) == fits
            if fits:
                jobs.append({"id": job_id, "t": clock.now, "units": arg, "refunded": False, "committed": False})
        elif op in ("refund", "commit") and jobs:
            job = jobs[int(arg) % len(jobs)]
            if op == "refund" and not job["committed"]:
                assert await quotas.refund(str(job["id"])) is (not job["refunded"])
                job["refunded"] = True
            elif op == "commit" and not job["refunded"]:
                assert await quotas.commit(str(job["id"])) is (not job["committed"])
                job["committed"] = True
        elif op == "grant":
            await quotas.grant(G, user, arg)
            grants.append((clock.now, arg))
        elif op == "advance":
            clock.advance(arg)
        status = await quotas.status(G, user, [])
        assert status.used == pytest.approx(model_used())
        assert status.granted == pytest.approx(model_granted())
        assert status.remaining == pytest.approx(max(0.0, limit + model_granted() - model_used()))
