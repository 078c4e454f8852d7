"""The consumer loop: fetch a batch, apply it in one transaction with its checkpoint, ack.

Exactly-once effects on top of at-least-once delivery: the highest applied stream sequence is
stored in the same transaction as the change, so a redelivered or replayed message is skipped.
Messages are applied strictly in stream order. A message whose handler keeps failing is retried
a bounded number of times inside its own savepoint, then written to the dead-letter subject
(through the outbox, in the same transaction) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp.v1 import event_pb2
from cdp_common import eventlog
from cdp_common.db import Added, Outbox
from cdp_common.pull import Puller

Handler = Callable[[AsyncConnection, event_pb2.Event], Awaitable[Sequence[eventlog.Outgoing]]]
# Applies a whole batch at once (a few queries instead of a few per event); when it fails, the
# loop falls back to the per-event handler, which isolates and dead-letters the bad message.
BatchHandler = Callable[[AsyncConnection, Sequence[event_pb2.Event]], Awaitable[Sequence[eventlog.Outgoing]]]



Changes = TypeVar("Changes")


@dataclass(frozen=True)
class Planned:
    """A batch decided in memory, written later in its own transaction (see `Pipeline`)."""

    write: Callable[[AsyncConnection], Awaitable[None]]
    outgoing: Sequence[eventlog.Outgoing]


class Pipeline(Protocol):
    """A batch handler in two stages, so that the next batch is decided while this one is written.

    `plan` reads the committed state outside any transaction, overlaid with what the batches it
    planned before (and not yet `committed`) change, which it keeps in memory, and decides; it
    returns None for a batch it does not take (the loop then applies it the plain way, after every
    earlier batch committed). `Planned.write` runs in the batch's transaction with its checkpoint.
    Only one process applies a consumer's log, so nothing else changes that state meanwhile.
    """

    async def plan(self, conn: AsyncConnection, events: Sequence[event_pb2.Event]) -> Planned | None: ...

    def committed(self, planned: Planned) -> None:
        """`planned` is durable: what it changed can be read from the database now."""

    def forget(self) -> None:
        """A planned batch was not written: drop everything planned and not committed."""


async def share_turn(n: int, every: int) -> None:
    """For a pipeline's long stretches of CPU work (deciding a batch takes tens of milliseconds):
    gives the event loop a turn after every `every` items, so that the batch being written
    meanwhile sends each of its statements when the one before is done, not after the decision."""
    if n % every == every - 1:
        await asyncio.sleep(0)


class Overlays(Generic[Changes]):
    """A pipeline's memory: what each batch it planned changes, kept from the plan until the batch
    commits (or until `forget`), for the next plans to read over what the database shows."""

    def __init__(self) -> None:
        self._pending: list[tuple[Planned, Changes]] = []

    def pending(self) -> list[Changes]:
        """The changes planned and not committed, oldest first."""
        return [changes for _, changes in self._pending]

    def keep(self, planned: Planned, changes: Changes) -> Planned:
        self._pending.append((planned, changes))
        return planned

    def committed(self, planned: Planned) -> None:
        self._pending = [(p, c) for p, c in self._pending if p is not planned]

    def forget(self) -> None:
        self._pending = []


class StalePlan(Exception):
    """What a batch was planned from moved before its write (the checkpoint, or rows the pipeline
    checks); the batch is taken again from the checkpoint, the plain way."""


log = structlog.get_logger("cdp.consumer")

# Room left for the dead-letter envelope around the original payload.
_DEAD_LETTER_PAYLOAD_LIMIT = eventlog.MAX_MESSAGE_BYTES - 64 * 1024


class TakenElsewhere(Exception):
    """Messages of the durable consumer went to another client between our deliveries."""


class LostLock(Exception):
    """The session holding this consumer's lock is gone: another replica may be applying now."""


class PermanentError(Exception):
    """The message can never be applied (e.g. it lacks what the handler needs): dead-letter it now."""


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer, named `<consumer-service>-<purpose>`."""

    durable: str
    area: str
    filter_subjects: tuple[str, ...] = ()
    batch: int = 200
    # Attempts of one message before it is dead-lettered.
    max_attempts: int = 5
    ack_wait_seconds: float = 30.0
    retry_backoff_seconds: float = 0.05
    # Two batches: the one being applied and the one fetched ahead of it.
    max_ack_pending: int = 400
    # How long a request waits for a message once the consumer has caught up.
    fetch_timeout_seconds: float = 1.0
    # How long a batch that is not full waits for more messages (`Puller`); services take it from
    # CDP_CONSUMER_LINGER_MS.
    linger_seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


# Failures asyncpg reports as plain database errors (a DBAPIError, its connection not invalidated):
# SQLSTATE class 08, the connection failed ("connection was closed in the middle of operation"),
# and 57P01-57P03, the server shutting down, crashed or still starting up after a restart.
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def infrastructure_failure(error: BaseException) -> bool:
    """The database or the log itself failed: retrying the handler cannot help."""
    if isinstance(error, DBAPIError) and (
        error.connection_invalidated
        or str(getattr(error.orig, "sqlstate", None) or "").startswith(_CONNECTION_SQLSTATES)
    ):
        return True
    return isinstance(error, OperationalError | InterfaceError | ConnectionError | OSError)


def _decoded(msgs: Sequence[Msg]) -> list[event_pb2.Event] | None:
    """The batch's events; None if one does not decode (the per-event path dead-letters it)."""
    try:
        return [eventlog.decode(msg.data) for msg in msgs]
    except Exception:  # noqa: BLE001 - any undecodable payload
        return None


class Consumer:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        engine: AsyncEngine,
        outbox: Outbox,
        schema: str,
        topology: eventlog.Topology,
        spec: ConsumerSpec,
        handler: Handler,
        batch_handler: BatchHandler | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self._js = js
        self._engine = engine
        self._outbox = outbox
        self._schema = schema
        self._topology = topology
        self.spec = spec
        self._handler = handler
        self._batch_handler = batch_handler
        self._pipeline = pipeline
        # With a pipeline: the last stream sequence applied or planned (None: read the checkpoint),
        # and the batch being written while the next one is planned.
        self._planned_through: int | None = None
        self._writing: asyncio.Task[None] | None = None
        # After a failure, the messages planned so far go the plain way (which isolates and
        # dead-letters a message that keeps failing).
        self._plain_through = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # While this process applies the log: the session holding the lock, which writes every
        # batch (so a commit proves the lock was held throughout), and a session of its own for
        # the pipeline's reads (autocommit). Kept between batches: a pool checkout pings.
        self._lock: AsyncConnection | None = None
        self._reading: AsyncConnection | None = None
        # The durable's next delivery (its consumer sequence) if all of them come to this process.
        self._next_delivery: int | None = None
        self._standby_logged = False
        # Outbox rows published after the last commit, deleted in the next transaction.
        self._published: list[int] = []
        # Publishing a committed batch's facts runs beside the next batch (the outbox keeps them
        # until published); each publish waits for the one before, so facts go out in order.
        self._publishing: asyncio.Task[None] | None = None
        self.applied = 0
        self.dead_lettered = 0
        # Read by the metrics at scrape time; only failures add to them.
        self.handler_errors = 0
        self.batch_failures = 0
        self.stale_plans = 0
        # The counts before the batch in hand: a batch that fails is rolled back and applied again.
        self._counted = (0, 0)
        # Called with each applied batch's duration in seconds (the metrics' histogram).
        self.on_batch: Callable[[float], None] | None = None
        # Called after each committed batch with the messages it applied and its perf_counter start
        # (tracing's consumer spans); None, as without tracing, costs the loop nothing per event.
        self.on_applied: Callable[[Sequence[Msg], float], None] | None = None

    @property
    def stream(self) -> str:
        return self._topology.stream(self.spec.area)

    def consumer_config(self, start_after: int = 0) -> ConsumerConfig:
        filters = list(self.spec.filter_subjects)
        return ConsumerConfig(
            durable_name=self.spec.durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_after else DeliverPolicy.ALL,
            opt_start_seq=start_after + 1 if start_after else None,
            # Messages are applied in order by one process, so one ack per batch (its last
            # message) acknowledges the whole batch.
            ack_policy=AckPolicy.ALL,
            ack_wait=self.spec.ack_wait_seconds,
            # Unlimited on purpose: the loop itself dead-letters a failing message after
            # max_attempts, so an outage of PostgreSQL never makes the server drop messages.
            max_deliver=-1,
            max_ack_pending=self.spec.max_ack_pending,
            filter_subjects=filters or None,
        )

    async def provision(self) -> None:
        """Creates the durable consumer if it does not exist (its position is fixed under the lock)."""
        try:
            await self._js.consumer_info(self.stream, self.spec.durable)
        except nats.js.errors.NotFoundError:
            await self._js.add_consumer(self.stream, self.consumer_config())

    async def _reposition(self, force: bool = False) -> None:
        """Makes the consumer deliver from the first message not applied yet, in order.

        Messages delivered but not applied (a previous holder died, or a batch failed) would
        otherwise come back only after ack_wait, behind newer ones: applying those first would move
        the checkpoint past them, and they would be skipped as applied. So the consumer is
        recreated at the checkpoint, as is one made by an older version with other settings.
        """
        info: ConsumerInfo | None
        try:
            info = await self._js.consumer_info(self.stream, self.spec.durable)
        except nats.js.errors.NotFoundError:
            info = None
        wanted = self.consumer_config()
        if not force and info is not None and info.num_ack_pending == 0 and (
            info.config.ack_policy == wanted.ack_policy
            and info.config.max_ack_pending == wanted.max_ack_pending
            and sorted(info.config.filter_subjects or [info.config.filter_subject or ""])
            == sorted(wanted.filter_subjects or [""])
        ):
            delivered = info.delivered.consumer_seq if info.delivered is not None else None
            self._next_delivery = None if delivered is None else delivered + 1
            return
        self._next_delivery = 1
        async with self._engine.connect() as conn:
            applied = await self._checkpoint(conn)
        if info is not None:
            await self._js.delete_consumer(self.stream, self.spec.durable)
        await self._js.add_consumer(self.stream, self.consumer_config(start_after=applied))
        log.info("consumer_repositioned", after_sequence=applied,
                 unacknowledged=info.num_ack_pending if info else 0)

    @property
    def lock_key(self) -> str:
        """The PostgreSQL advisory lock (`hashtext` of this) held by the process applying the log."""
        return f"cdp-consumer:{self._schema}:{self.spec.durable}"

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running loop (None before `start`)."""
        return self._task

    @property
    def stopped(self) -> bool:
        """`stop` was called (and `start` not since)."""
        return self._stopping.is_set()

    @property
    def active(self) -> bool:
        """This process holds the consumer's lock and applies its messages (not a standby)."""
        return self._lock is not None

    async def start(self, reposition: bool = False) -> asyncio.Task[None]:
        """Starts (or, after `stop`, restarts) the loop; `reposition`: deliver from the checkpoint
        whatever JetStream's position (after the read model was replaced)."""
        await self.provision()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(reposition), name=f"consumer:{self.spec.durable}")
        return self._task

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stops fetching; the batch in hand is finished, or naked if it takes too long."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_seconds)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, reposition: bool) -> None:
        bound = structlog.contextvars.bound_contextvars
        with bound(consumer=self.spec.durable):
            # One process at a time applies a durable consumer's messages: the checkpoint is one
            # high-water mark, and two processes fetching different batches would skip each
            # other's. Other replicas wait here as hot standbys; the lock goes with the session,
            # so a replica that dies hands over at once.
            async with self._engine.connect() as lock:
                key = self.lock_key
                while not self._stopping.is_set():
                    held = await lock.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key})
                    if held.scalar():
                        break
                    if not self._standby_logged:
                        log.info("standby", reason="another replica applies this consumer")
                        self._standby_logged = True
                    await self._pause(1.0)
                else:
                    return
                # The lock is the session's: ending the transaction the try opened keeps it.
                await lock.commit()
                self._lock = lock
                await self._flush_outbox()
                puller = Puller(self._js._nc, self.stream, self.spec.durable, self.spec.batch,  # noqa: SLF001
                                self.spec.fetch_timeout_seconds, self.spec.linger_seconds)
                try:
                    await self._reposition(force=reposition)
                    async with self._engine.connect() as reading:
                        self._reading = await reading.execution_options(isolation_level="AUTOCOMMIT")
                        await self._loop(puller)
                finally:
                    with contextlib.suppress(BaseException):
                        await self._drop_plans()
                    self._lock = self._reading = None
                    await puller.forget()
                    with contextlib.suppress(BaseException):
                        await self._published_so_far()
                    with contextlib.suppress(Exception):
                        await self._forget_published()
                    # The session goes back to the pool, and a session lock would go with it.
                    with contextlib.suppress(Exception):
                        await lock.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})

    async def _loop(self, puller: Puller) -> None:
        failures = 0
        reposition = False
        while not self._stopping.is_set():
            try:
                if reposition:
                    # Whatever was delivered and not applied is delivered again, in order, before
                    # anything newer: nothing is applied ahead of a batch that failed. Only by the
                    # holder of the lock: one that lost it would move the new holder's position.
                    await self._still_locked()
                    await puller.forget()
                    await self._reposition(force=True)
                    reposition = False
                msgs = await puller.fetch()
            except LostLock:
                raise
            except Exception as error:  # noqa: BLE001 - the log or the database is down: wait, retry
                reposition = True
                log.warning("fetch_failed", error=repr(error))
                await self._pause(1.0)
                continue
            try:
                if msgs:
                    self._check_deliveries(msgs)
                    await self._take(msgs)
                else:
                    await self._written()
                failures = 0
            except (asyncio.CancelledError, LostLock):
                # Lost lock: stop, so the process exits and its supervisor restarts it as a standby.
                # The next holder repositions the consumer at the checkpoint.
                raise
            except StalePlan as stale:
                # Not a failure: what the plan read moved before its write (the profile scoring job
                # rescored a profile, say). The batch is taken again from the checkpoint, the plain
                # way, at once.
                self.stale_plans += 1
                await self._drop_plans()
                self.applied, self.dead_lettered = self._counted
                reposition = True
                log.info("plan_stale", reason=str(stale), messages=len(msgs))
                continue
            except Exception as error:  # noqa: BLE001 - the loop must go on
                failures += 1
                self.batch_failures += 1
                await self._drop_plans()
                self.applied, self.dead_lettered = self._counted
                reposition = True
                log.error("batch_failed", error=repr(error), messages=len(msgs))
                await self._pause(min(0.2 * 2**failures, 5.0))
                continue
            if not msgs:
                try:
                    await self._published_so_far()
                    await self._forget_published()
                except Exception as error:  # noqa: BLE001 - the log or the database is down: wait, retry
                    reposition = True
                    log.warning("publish_failed", error=repr(error))
                    await self._pause(1.0)

    def _check_deliveries(self, msgs: Sequence[Msg]) -> None:
        """Raises TakenElsewhere if deliveries of the durable went elsewhere since the last batch,
        e.g. to a process that lost its lock without knowing yet. Acknowledging this batch (ack
        all) would acknowledge them unapplied; the consumer is repositioned instead."""
        first, last = msgs[0].metadata.sequence.consumer, msgs[-1].metadata.sequence.consumer
        expected, self._next_delivery = self._next_delivery, last + 1
        if (expected is not None and first != expected) or last - first != len(msgs) - 1:
            self._next_delivery = None
            raise TakenElsewhere(
                f"of deliveries {expected or first}..{last} of {self.spec.durable}, only {len(msgs)} "
                f"(from {first}) came to this process"
            )

    async def _take(self, msgs: Sequence[Msg]) -> None:
        """Applies a batch; with a pipeline, decides it while the batch before is being written."""
        if self._pipeline is None:
            await self.process(msgs)
            return
        planned = await self._plan(msgs)
        await self._written()
        if planned is None:
            await self.process(msgs)
        else:
            self._writing = asyncio.create_task(self.process(msgs, planned))

    async def _plan(self, msgs: Sequence[Msg]) -> tuple[int, Planned] | None:
        """Stage one: the batch's new messages decided from where the batches before leave off;
        None to apply it the plain way (a lone message, or the pipeline declined or failed)."""
        assert self._pipeline is not None
        if self._planned_through is None:
            await self._written()
            async with self._reads() as conn:
                self._planned_through = int(await self._checkpoint(conn))
        after = self._planned_through
        fresh = [msg for msg in msgs if msg.metadata.sequence.stream > after]
        if len(fresh) < 2 or fresh[0].metadata.sequence.stream <= self._plain_through:
            return None
        events = _decoded(fresh)
        if events is None:
            return None
        try:
            async with self._reads() as conn:
                planned = await self._pipeline.plan(conn, events)
        except Exception as error:  # noqa: BLE001 - decided in _declined
            self._declined(error, len(fresh))
            return None
        if planned is None:
            return None
        self._planned_through = fresh[-1].metadata.sequence.stream
        return after, planned

    @contextlib.asynccontextmanager
    async def _reads(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads outside a transaction."""
        reading = self._reading
        if reading is None:
            async with self._engine.connect() as conn:
                yield conn
            return
        try:
            yield reading
        finally:
            # Ends SQLAlchemy's own transaction (autocommit: no round trip); after a lost
            # connection, the next read reconnects.
            await reading.rollback()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A batch's transaction: in the session holding the lock, when this process holds it."""
        lock = self._lock
        if lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with lock.begin():
            yield lock

    async def _still_locked(self) -> None:
        """Before repositioning: raises LostLock if the session holding the lock is gone (and with
        it the lock: another replica may be applying by now)."""
        lock = self._lock
        if lock is None:
            return
        try:
            # Asked of the server: SQLAlchemy reconnects a connection it invalidated, and a new
            # session holds no lock.
            held = (await lock.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
            ))).scalar()
            await lock.commit()
        except Exception as error:  # noqa: BLE001 - any failure means the lock may be lost
            raise LostLock(f"the session holding the lock of {self.spec.durable} failed: {error!r}") from error
        if not held:
            raise LostLock(f"the session holding the lock of {self.spec.durable} ended")

    async def _written(self) -> None:
        """Waits for the batch being written; raises its failure."""
        task, self._writing = self._writing, None
        if task is not None:
            await task

    async def _drop_plans(self) -> None:
        """After a failure: nothing planned is written, and the next plan starts at the checkpoint."""
        with contextlib.suppress(Exception):
            await self._written()
        self._plain_through = max(self._plain_through, self._planned_through or 0)
        self._planned_through = None
        if self._pipeline is not None:
            self._pipeline.forget()

    async def _checkpoint(self, conn: AsyncConnection) -> int:
        value = (
            await conn.execute(
                text(f"SELECT stream_sequence FROM {self._schema}.checkpoints WHERE consumer = :c"),
                {"c": self.spec.durable},
            )
        ).scalar()
        return int(value or 0)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _flush_outbox(self) -> None:
        try:
            await self._outbox.flush()
        except eventlog.LOG_UNAVAILABLE as error:
            log.warning("outbox_flush_failed", error=str(error))

    async def process(self, msgs: Sequence[Msg], planned: tuple[int, Planned] | None = None) -> None:
        """Applies a batch: one transaction for the changes, the facts and the checkpoint.

        `planned`: the batch as the pipeline decided it, from the checkpoint it names."""
        started = time.perf_counter()
        self._counted = (self.applied, self.dead_lettered)
        self._raise_publish_failure()
        added: list[Added] = []
        deleting = self._published
        async with self._transaction() as conn:
            await self._outbox.delete(conn, deleting)
            # Creates the row on first use and locks it: a second applier waits here, then skips.
            applied_up_to: int = (
                await conn.execute(
                    text(
                        f"INSERT INTO {self._schema}.checkpoints AS c (consumer) VALUES (:c) ON CONFLICT (consumer) "
                        "DO UPDATE SET consumer = c.consumer RETURNING c.stream_sequence"
                    ),
                    {"c": self.spec.durable},
                )
            ).scalar_one()
            last = applied_up_to
            fresh = [msg for msg in msgs if msg.metadata.sequence.stream > applied_up_to]
            if planned is not None:
                after, plan = planned
                if after != applied_up_to:
                    raise StalePlan(f"planned after sequence {after}, but the checkpoint is at {applied_up_to}")
                await plan.write(conn)
                added.append(await self._outbox.add(conn, plan.outgoing))
                self.applied += len(fresh)
                last = fresh[-1].metadata.sequence.stream
                fresh = []
            elif fresh and await self._apply_batch(conn, fresh, added):
                last = fresh[-1].metadata.sequence.stream
                fresh = []
            for msg in fresh:
                sequence = msg.metadata.sequence.stream
                if sequence <= last:
                    continue
                added.append(await self._outbox.add(conn, await self._apply(conn, msg)))
                last = sequence
            if last != applied_up_to:
                await conn.execute(
                    text(
                        f"UPDATE {self._schema}.checkpoints SET stream_sequence = :s, updated_at = now() "
                        "WHERE consumer = :c"
                    ),
                    {"s": last, "c": self.spec.durable},
                )
        # Rows published meanwhile were appended after the ones this transaction deleted.
        self._published = self._published[len(deleting):]
        if self._pipeline is not None:
            if planned is None:
                self._planned_through = last
            else:
                self._pipeline.committed(planned[1])
        # Acknowledged once committed: the facts are safe in the outbox.
        await msgs[-1].ack()
        self._publishing = asyncio.create_task(self._publish(self._publishing, added))
        if self.on_batch is not None:
            self.on_batch(time.perf_counter() - started)
        if self.on_applied is not None:
            self.on_applied([msg for msg in msgs if msg.metadata.sequence.stream > applied_up_to], started)

    async def _publish(self, before: asyncio.Task[None] | None, added: Sequence[Added]) -> None:
        if before is not None:
            await before
        published = await self._outbox.publish(added)
        self._published = [*self._published, *published]

    def _raise_publish_failure(self) -> None:
        """A background publish that failed fails the next batch (the loop then starts over from
        the checkpoint, and the outbox publishes what waits in it first)."""
        task = self._publishing
        if task is not None and task.done():
            self._publishing = None
            task.result()

    async def _published_so_far(self) -> None:
        """Waits for the background publishing; raises its failure."""
        task, self._publishing = self._publishing, None
        if task is not None:
            await task

    async def _forget_published(self) -> None:
        """Deletes the outbox rows already published (done with the next batch while busy)."""
        if self._published:
            async with self._engine.begin() as conn:
                await self._outbox.delete(conn, self._published)
            self._published = []

    def _declined(self, error: Exception, messages: int) -> None:
        """A whole-batch path failed: an infrastructure failure fails the batch; anything else is
        counted, and the caller takes the batch a plainer way (down to message by message)."""
        if infrastructure_failure(error):
            raise error
        self.handler_errors += 1
        log.warning("batch_handler_failed", error=repr(error), messages=messages)

    async def _apply_batch(self, conn: AsyncConnection, msgs: Sequence[Msg], added: list[Added]) -> bool:
        """The whole batch through the batch handler, in one savepoint; False to go one by one."""
        if self._batch_handler is None or len(msgs) < 2:
            return False
        events = _decoded(msgs)
        if events is None:
            return False
        try:
            async with conn.begin_nested():
                outgoing = await self._batch_handler(conn, events)
                added.append(await self._outbox.add(conn, outgoing))
        except Exception as error:  # noqa: BLE001 - decided in _declined
            self._declined(error, len(msgs))
            return False
        self.applied += len(events)
        return True

    async def _apply(self, conn: AsyncConnection, msg: Msg) -> Sequence[eventlog.Outgoing]:
        try:
            event = eventlog.decode(msg.data)
        except Exception as undecodable:  # noqa: BLE001 - undecodable bytes can never succeed
            return [self._dead_letter(msg, f"undecodable payload: {undecodable}", attempts=1)]
        error: BaseException | None = None
        with structlog.contextvars.bound_contextvars(
            event_id=event.id, correlation_id=event.correlation_id or event.id
        ):
            for attempt in range(1, self.spec.max_attempts + 1):
                try:
                    async with conn.begin_nested():
                        outgoing = await self._handler(conn, event)
                    self.applied += 1
                    return outgoing
                except PermanentError as caught:
                    self.handler_errors += 1
                    log.error("dead_lettered", attempts=attempt, error=str(caught))
                    return [self._dead_letter(msg, str(caught), attempts=attempt)]
                except Exception as caught:  # noqa: BLE001 - decided below
                    if infrastructure_failure(caught):
                        raise
                    error = caught
                    self.handler_errors += 1
                    log.warning("handler_failed", attempt=attempt, error=repr(caught))
                    await asyncio.sleep(self.spec.retry_backoff_seconds * attempt)
            log.error("dead_lettered", attempts=self.spec.max_attempts, error=repr(error))
            return [self._dead_letter(msg, repr(error), attempts=self.spec.max_attempts)]

    def _dead_letter(self, msg: Msg, reason: str, attempts: int) -> eventlog.Outgoing:
        self.dead_lettered += 1
        sequence = msg.metadata.sequence.stream
        event = eventlog.new_event(
            "dead_lettered",
            event_id=eventlog.derived_id(f"{self.stream}:{sequence}", f"dlq:{self.spec.durable}"),
            source=self.spec.durable,
        )
        event.dead_lettered.consumer = self.spec.durable
        event.dead_lettered.stream = self.stream
        event.dead_lettered.stream_sequence = sequence
        event.dead_lettered.original_subject = msg.subject
        event.dead_lettered.original_payload = msg.data[:_DEAD_LETTER_PAYLOAD_LIMIT]
        event.dead_lettered.error = reason[:2000]
        event.dead_lettered.attempts = attempts
        return eventlog.Outgoing(self._topology.deadletter(self.spec.durable), event)
