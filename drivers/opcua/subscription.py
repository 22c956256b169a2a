"""The OPC UA subscription: monitored items with server-side queues derived from the revised intervals,
overflow accounting, and each notification's items queued and delivered as one batch.

asyncua's iterator mode wraps every value in a queued event object of its own, which cost more CPU than
the rest of the daemon's path per value; `BatchSubscription` queues each notification's item list as it
arrives, bounded in values, and `events()` walks the lists.

Every change the server reports is delivered without per-tag tuning: items are sampled as fast as the
server can (sampling interval 0) and get a server-side queue sized from the intervals the server revised
(`derived_queue_size`), so no value is conflated inside a publishing interval. A value the server flags
with the Overflow bit (its queue for the item overflowed) is counted (`overflows`, and the driver errors
of kind server_overflow), and each transition logged once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from asyncua import Client, Node, ua
from asyncua.client.ua_session import UaSession
from asyncua.common.subscription import Subscription, SubscriptionItemData
from asyncua.observer import Observer

from drivers.opcua.config import OpcUaConnection, OpcUaTag
from drivers.opcua.publish import DataChanges, Item, PublishDecodeError, items_of, overflowed_handles
from drivers.opcua.publish import install as install_publish_decoder
from drivers.sdk import DriverMetrics

# Status tags keep at least this many values, so a state that lasts less than a publishing interval is
# reported even where the derived queue is shorter (a long sampling interval).
STATUS_QUEUE_SIZE = 10
# A derived server-side queue holds every sample of one publishing interval and of a publish response
# this late on top (at least one more publishing interval): the client keeps one PublishRequest in
# flight (asyncua does), so while it is busy (a collection, a slow disk commit, a retransmitted TCP
# segment: 200 ms at the least on Linux) the server keeps sampling into the queue with nowhere to send.
LATE_PUBLISH_MS = 1000.0
# At least 2 (one late interval at one sample per interval); at most 1,000: a second of samples at 1 kHz,
# and a bound on what one item may hold in the server's memory (servers cap it lower or higher anyway).
MIN_QUEUE_SIZE, MAX_QUEUE_SIZE = 2, 1000
# A server revising the sampling interval to 0 reports changes as they happen, at no rate it tells:
# assume changes no closer together than this.
EXCEPTION_SAMPLING_MS = 10.0
# Overflow flagged by the server: "no longer overflowing" after this long without a flagged value.
OVERFLOW_QUIET_S = 10.0


def derived_queue_size(publishing_ms: float, sampling_ms: float | None) -> int:
    """The server-side queue for an item sampled every `sampling_ms` in a subscription publishing every
    `publishing_ms` (both as the server revised them): every sample of a publishing interval and of a
    late publish on top, bounded to MIN_QUEUE_SIZE..MAX_QUEUE_SIZE.

    A sampling interval of 0 (the server reports changes as they happen), an unknown one, or one the
    server left negative (-1: "the publishing interval") is read as EXCEPTION_SAMPLING_MS or the
    publishing interval respectively.
    """
    if sampling_ms is None or not math.isfinite(sampling_ms) or sampling_ms == 0:
        sampling_ms = EXCEPTION_SAMPLING_MS
    elif sampling_ms < 0:
        sampling_ms = publishing_ms
    span = publishing_ms + max(publishing_ms, LATE_PUBLISH_MS)
    return max(MIN_QUEUE_SIZE, min(MAX_QUEUE_SIZE, math.ceil(span / sampling_ms)))


class Counters(Observer):
    """asyncua observer: request latency, publish responses and the values they carried."""

    def __init__(self, metrics: DriverMetrics) -> None:
        self.metrics = metrics
        self.produced = 0

    def observe_request(self, request: Any) -> AbstractContextManager[None]:
        # Publish requests are long polls; their duration says nothing about the device.
        if isinstance(request, ua.PublishRequest):
            return nullcontext()
        return super().observe_request(request)

    def on_request(self, request_type: str, duration: float, error: BaseException | None) -> None:
        self.metrics.request(duration)

    def on_notification(self, subscription_id: int | None, event_count: int) -> None:
        self.produced += event_count
        self.metrics.read(values=event_count)  # once per publish response, as the other drivers count per poll


class BatchSubscription(Subscription):
    """A subscription that queues each notification's item list whole, not one asyncua event per value."""

    def __init__(
        self,
        session: UaSession,
        params: ua.CreateSubscriptionParameters,
        maxsize: int,
        on_dropped: Callable[[int], None],
        on_values: Callable[[list[int]], None],
    ) -> None:
        # asyncua's own per-event queue stays empty: publish_callback below replaces its delivery.
        super().__init__(session, params, None, queue_maxsize=1)
        # Item lists of data changes, and a bad status code where the server or the client ended it.
        self.batches: deque[list[Item] | ua.StatusCode] = deque()
        self.pending = 0  # values in `batches`
        self.maxsize = maxsize
        self.closed = False
        self.ready = asyncio.Event()
        self._on_dropped = on_dropped
        self._on_values = on_values

    async def create_items(self, requests: list[ua.MonitoredItemCreateRequest]) -> list[ua.MonitoredItemCreateResult]:
        """Create monitored items and return the server's results whole (its revised parameters too)."""
        params = ua.CreateMonitoredItemsParameters(
            SubscriptionId=self.subscription_id, ItemsToCreate=requests, TimestampsToReturn=ua.TimestampsToReturn.Both
        )
        results = await self.server.create_monitored_items(params)
        for request, result in zip(requests, results, strict=True):
            if result.StatusCode.is_good():
                # What asyncua keeps to create the item again (its stale-subscription watchdog).
                asked = request.RequestedParameters
                data = SubscriptionItemData()
                data.node = Node(self.server, request.ItemToMonitor.NodeId)
                data.attribute = request.ItemToMonitor.AttributeId
                data.client_handle = asked.ClientHandle
                data.server_handle = result.MonitoredItemId
                data.queuesize = asked.QueueSize
                data.sampling_interval = asked.SamplingInterval
                data.monitoring_mode = request.MonitoringMode
                self._monitored_items[asked.ClientHandle] = data
        return results

    async def resize_queues(self, sizes: dict[int, int]) -> dict[int, int]:
        """Ask the server for other queue sizes (by client handle); return the sizes it granted."""
        items = [self._monitored_items[h] for h in sizes]
        params = ua.ModifyMonitoredItemsParameters(
            SubscriptionId=self.subscription_id,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToModify=[
                ua.MonitoredItemModifyRequest(
                    MonitoredItemId=item.server_handle,
                    RequestedParameters=ua.MonitoringParameters(
                        ClientHandle=item.client_handle,
                        SamplingInterval=item.sampling_interval,
                        QueueSize=sizes[handle],
                        DiscardOldest=True,
                    ),
                )
                for handle, item in zip(sizes, items, strict=True)
            ],
        )
        results = await self.server.modify_monitored_items(params)
        granted: dict[int, int] = {}
        for (handle, size), item, result in zip(sizes.items(), items, results, strict=True):
            if result.StatusCode.is_good():
                item.queuesize = size
                granted[handle] = int(result.RevisedQueueSize) or size
        return granted

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        message = publish_result.NotificationMessage
        data = message.NotificationData
        if data is None:
            return
        self.last_sequence_number = int(message.SequenceNumber)
        if not data:
            return  # a keep-alive
        values = 0
        overflowed: list[int] = []
        for notif in data:
            if type(notif) is DataChanges:
                items = notif.items
                overflowed += notif.overflowed
            elif isinstance(notif, ua.DataChangeNotification):  # decoded by asyncua (not via the session)
                items = items_of(notif)
                overflowed += overflowed_handles(items)
            else:
                items = []
                if isinstance(notif, ua.StatusChangeNotification):
                    if notif.Status is not None and notif.Status.is_bad():
                        self.batches.append(notif.Status)
            if items:
                self.batches.append(items)
                values += len(items)
        if values:
            self.pending += values
            if self.pending > self.maxsize:
                self._trim(self.pending - self.maxsize)
            self._on_values(overflowed)
        self.ready.set()
        self._observe(lambda: self.server.observer.on_notification(self.subscription_id, values))

    def _trim(self, excess: int) -> None:
        """Drop the oldest `excess` values (never a status), so a slow consumer costs bounded memory."""
        batches = self.batches
        held: list[ua.StatusCode] = []
        dropped = 0
        while dropped < excess and batches:
            entry = batches.popleft()
            if isinstance(entry, ua.StatusCode):
                held.append(entry)
                continue
            n = min(len(entry), excess - dropped)
            if n < len(entry):
                batches.appendleft(entry[n:])
            dropped += n
        for status in reversed(held):
            batches.appendleft(status)
        self.pending -= dropped
        self._on_dropped(dropped)

    def _close_iterator(self) -> None:
        # Called by delete(): the consumer drains what is queued, then ends.
        super()._close_iterator()
        self.closed = True
        self.ready.set()


class Monitoring:
    """The driver's side of its subscription: items, queue sizes, overflow and drop accounting.

    A mixin of OpcUaDriver; the attributes below are the driver's.
    """

    log: Any
    metrics: DriverMetrics
    conn: OpcUaConnection
    tags: list[OpcUaTag]
    status_tags: set[str]
    node_ids: dict[str, ua.NodeId]
    unavailable: dict[str, str]

    def _init_monitoring(self) -> None:
        self.subscription: BatchSubscription | None = None
        self.handles: dict[int, OpcUaTag] = {}
        self.dropped = 0
        self.queue_maxsize = 0
        self.publishing_ms = self.conn.publishing_interval_ms  # as the server revised it
        self.queue_sizes: dict[str, int] = {}  # tag name -> the server-side queue size granted
        self.overflows = 0  # values the server flagged with the Overflow bit, this session
        self.overflowing = False
        self.undecodable = 0  # Publish responses that could not be decoded (their values are lost)
        self.overflow_quiet_s = OVERFLOW_QUIET_S
        self._overflow_at = 0.0
        self._counters = Counters(self.metrics)

    async def _subscribe(self, client: Client) -> None:
        """One subscription; a monitored item per resolvable tag; a tag the server refuses is unavailable."""
        monitored = [t for t in self.tags if t.name in self.node_ids]
        self.handles = {}
        self.queue_sizes = {}
        self._counters.produced = 0
        self.dropped = 0
        self.overflows = 0
        self.overflowing = False
        sub = await self._create_subscription(client, self.conn.publishing_interval_ms)
        requests = []
        for handle, tag in enumerate(monitored, start=1):
            rv = ua.ReadValueId(NodeId=self.node_ids[tag.name], AttributeId=ua.AttributeIds.Value)
            sampling = self._sampling_ms(tag)
            # A first guess: sampled as asked, or at the publishing interval when asked for 0.
            params = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=sampling,
                QueueSize=self._queue_size(tag, sampling or self.publishing_ms),
                DiscardOldest=True,  # on overflow the newest values stay; order is kept either way
            )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=rv, MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params
                )
            )
            self.handles[handle] = tag
        results = await sub.create_items(requests) if requests else []
        granted: dict[int, int] = {}
        resize: dict[int, int] = {}
        for request, result in zip(requests, results, strict=True):
            handle = request.RequestedParameters.ClientHandle
            if not result.StatusCode.is_good():
                tag = self.handles.pop(handle)
                self.unavailable[tag.name] = f"{result.StatusCode.name}"
                continue
            # The queue the revised sampling interval needs; only a guess that missed costs a round trip.
            want = self._queue_size(self.handles[handle], result.RevisedSamplingInterval)
            granted[handle] = int(result.RevisedQueueSize) or request.RequestedParameters.QueueSize
            if want != request.RequestedParameters.QueueSize:
                resize[handle] = want
        if resize:
            try:
                granted.update(await sub.resize_queues(resize))
            except ua.UaStatusCodeError as err:
                # A server without ModifyMonitoredItems keeps the first guess; values still flow.
                self.log.info("queue_resize_refused", items=len(resize), status=ua.StatusCode(err.code).name)
        self.queue_sizes = {self.handles[h].name: size for h, size in granted.items()}
        sub.maxsize = self.queue_maxsize = self._queue_maxsize(sum(granted.values()))

    async def _create_subscription(self, client: Client, period_ms: float) -> BatchSubscription:
        """What Client.create_subscription does, with the batch-queueing subscription."""
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=period_ms,
            RequestedLifetimeCount=10000,
            RequestedMaxKeepAliveCount=client.get_keepalive_count(period_ms),
            MaxNotificationsPerPublish=10000,
            PublishingEnabled=True,
            Priority=0,
        )
        session = client.uaclient.session
        install_publish_decoder(session, self._note_undecodable)
        # The client-side bound is set once the items' queues are known.
        sub = BatchSubscription(session, params, self._queue_maxsize(0), self._note_dropped, self._note_values)
        # Set before init: a failing connect tears it down like any other.
        self.subscription = sub
        results = await sub.init()
        revised = client.get_subscription_revised_params(params, results)
        if revised:
            await sub.update(revised)
        interval = results.RevisedPublishingInterval
        self.publishing_ms = interval if math.isfinite(interval) and interval > 0 else period_ms
        # The client's stale-subscription watchdog re-creates what it finds here.
        client._subscriptions.append(sub)
        return sub

    def _queue_maxsize(self, queued: int) -> int:
        # One publish response may carry every queued value of every item at once; the client-side
        # queue must hold all of them (twice, for a consumer one response behind), or the oldest are
        # dropped (counted and logged).
        return max(1000, 2 * queued + 16)

    def _queue_size(self, tag: OpcUaTag, sampling_ms: float | None) -> int:
        """The tag's `queue_size`, else derived from the (revised) intervals; status tags keep a floor."""
        if tag.queue_size is not None:
            return tag.queue_size
        size = derived_queue_size(self.publishing_ms, sampling_ms)
        return max(size, STATUS_QUEUE_SIZE) if tag.name in self.status_tags else size

    def _sampling_ms(self, tag: OpcUaTag) -> float:
        # 0: the server's fastest practical rate, on change where it can; the queue takes the rest.
        return tag.sampling_interval_ms if tag.sampling_interval_ms is not None else 0.0

    def _note_values(self, overflowed: list[int]) -> None:
        """A publish response with values: count those the server flagged Overflow; log the transitions."""
        now = time.monotonic()
        if overflowed:
            self.overflows += len(overflowed)
            self.metrics.error("server_overflow", len(overflowed))
            self._overflow_at = now
            if not self.overflowing:
                self.overflowing = True
                names = sorted({self.handles[h].name for h in overflowed if h in self.handles})
                self.log.warning(
                    "server_queue_overflow",
                    values=len(overflowed),
                    tags=names[:10],
                    queue_sizes={n: self.queue_sizes.get(n) for n in names[:10]},
                    reason="the server's queue for these items overflowed: values were lost before they were sent",
                )
        elif self.overflowing and now - self._overflow_at >= self.overflow_quiet_s:
            self.overflowing = False
            self.log.info("server_queue_overflow_ended", overflows=self.overflows)

    def _note_undecodable(self, err: PublishDecodeError) -> None:
        # asyncua skips the response and goes on; its values are lost. Counted; logged once per session.
        if self.undecodable == 0:
            self.log.warning("publish_response_undecodable", error=str(err))
        self.undecodable += 1
        self.metrics.error("decode")

    def _note_dropped(self, n: int) -> None:
        if self.dropped == 0:
            self.log.warning("notifications_dropped", dropped=n, queue_maxsize=self.queue_maxsize)
        self.dropped += n
        self.metrics.dropped(n)
