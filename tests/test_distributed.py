"""torchrun coordination, with the ranks as threads over one in-process store (the protocol, fast)."""

import threading
import time

from torch.distributed import HashStore

from geoscout.data import load_competition
from geoscout.extract import runner
from geoscout.extract.distributed import PeerFailed, Ranks
from geoscout.problems import InputError


def run_ranks(world: int, body, timeout_s: float = 30.0):
    """Run body(ranks) for every rank in its own thread: ({rank: result}, {rank: exception}, seconds)."""
    store = HashStore()
    results, errors = {}, {}

    def target(rank: int) -> None:
        ranks = Ranks(rank=rank, world_size=world, local_world_size=world, store=store, timeout_s=timeout_s)
        try:
            results[rank] = body(ranks)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[rank] = exc
        finally:
            ranks.close()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
    return results, errors, time.monotonic() - start


def test_rank_0_plans_and_every_rank_gets_the_plan_and_each_others_parts():
    planned = []

    def body(ranks):
        plan = ranks.broadcast("plan", lambda: planned.append(ranks.rank) or {"pending": [3, 5, 8]})
        ranks.step("work", lambda: time.sleep(0.05 * ranks.rank))
        return plan, ranks.gather("parts", lambda: ranks.rank * 10)

    results, errors, _ = run_ranks(3, body)
    assert not errors
    assert planned == [0]  # only rank 0 decides
    assert all(r == ({"pending": [3, 5, 8]}, [0, 10, 20]) for r in results.values())


def busy(ranks, seconds: float = 20.0) -> str:
    """Work as extraction does: batch after batch, looking for another rank's failure in between."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
        ranks.check(throttle=True)
    return "finished"


def test_a_failing_rank_stops_a_busy_rank_and_a_waiting_rank_at_once():
    def body(ranks):
        if ranks.rank == 1:
            ranks.step("embed", lambda: 1 / 0)
        if ranks.rank == 2:
            return ranks.step("embed", lambda: None)  # done early, waiting for the others
        return ranks.step("embed", lambda: busy(ranks))

    results, errors, seconds = run_ranks(3, body)
    assert not results
    assert isinstance(errors[1], ZeroDivisionError)
    for rank in (0, 2):
        assert isinstance(errors[rank], PeerFailed)
        assert "rank 1 failed (ZeroDivisionError: division by zero)" in str(errors[rank])
    assert seconds < 5  # not the 20 s of work, nor any timeout


def test_a_failure_on_rank_0_while_planning_reaches_the_others():
    def body(ranks):
        return ranks.broadcast("plan", lambda: (_ for _ in ()).throw(ValueError("store of another dataset")))

    _, errors, seconds = run_ranks(2, body)
    assert isinstance(errors[0], ValueError)
    assert isinstance(errors[1], PeerFailed) and "rank 0 failed (ValueError: store of another dataset)" in str(errors[1])
    assert seconds < 5


def test_a_rank_that_neither_finishes_nor_fails_is_named_after_the_timeout():
    def body(ranks):
        if ranks.rank == 1:
            time.sleep(2)  # hung, then gone without a word
            return None
        return ranks.step("embed")

    _, errors, _ = run_ranks(2, body, timeout_s=0.5)
    assert isinstance(errors[0], PeerFailed) and "waited" in str(errors[0]) and "'embed'" in str(errors[0])


def test_the_image_check_is_shared_and_rank_0_lists_every_bad_image_at_its_line(synth_dir, monkeypatch):
    competition = load_competition(synth_dir)
    table = competition.train
    for row in (3, 30):  # one in each rank's half of the 40 rows
        (table.images_dir / table.image_names[row, 2]).write_bytes(b"")
    checked = []
    real = runner.find_image_problems
    monkeypatch.setattr(runner, "find_image_problems", lambda t, **kw: checked.append(len(t)) or real(t, **kw))

    _, errors, _ = run_ranks(2, lambda ranks: runner._check_images(ranks, competition, ("train",), progress=False))
    assert sorted(checked) == [20, 20]  # each rank decoded its half
    assert isinstance(errors[0], InputError)
    found = {(p.line, p.sample_id, p.column) for p in errors[0].problems}
    assert found == {(5, str(table.sample_id[3]), "image_south"), (32, str(table.sample_id[30]), "image_south")}
    assert isinstance(errors[1], PeerFailed) and "2 bad image(s)" in str(errors[1])


def test_alone_every_meeting_point_is_just_the_work():
    ranks = Ranks()
    assert ranks.broadcast("plan", lambda: [1]) == [1]
    assert ranks.gather("parts", lambda: 7) == [7]
    assert ranks.step("work", lambda: "done") == "done"
    ranks.check()
    ranks.close()
