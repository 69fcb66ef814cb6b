"""admin_service: lawchat.v1.AdminService — status, the degraded switch, limits, model reload, drain, documents
added to (or deleted from) the retrieval index at run time, and LoRA adapters loaded or unloaded at run time."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from lawchat.v1 import admin_pb2, admin_pb2_grpc

from . import __version__
from .breaker import Breaker
from .engine.engine import EngineClosed
from .engine.lora import AdapterError, name_problem
from .engine_slot import EngineSlot, ReloadError
from .knowledge import Document, InvalidDocuments, add_documents, delete_documents
from .limiter import Limiter, LimitsConfig, Rate

log = logging.getLogger("lawchat.admin")

BREAKER_STATES = {"closed": admin_pb2.BREAKER_STATE_CLOSED, "open": admin_pb2.BREAKER_STATE_OPEN,
                  "half_open": admin_pb2.BREAKER_STATE_HALF_OPEN}
RELOAD_CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "busy": grpc.StatusCode.ABORTED,
                "failed": grpc.StatusCode.FAILED_PRECONDITION}


def adapter_message(info: dict) -> admin_pb2.Adapter:
    return admin_pb2.Adapter(name=info["name"], path=info["path"], rank=info["rank"],
                             target_modules=info["target_modules"], on_device=info["on_device"],
                             requests=info["requests"], running=info["running"])


def limits_message(cfg: LimitsConfig) -> admin_pb2.Limits:
    return admin_pb2.Limits(**{name: admin_pb2.RateLimit(rate=getattr(cfg, name).rate, burst=getattr(cfg, name).burst)
                               for name in LimitsConfig.RATES})


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, slot: EngineSlot, breaker: Breaker, limiter: Limiter, auth_enabled: bool,
                 grace_seconds: float, on_drain=None, retriever=None):
        self.slot, self.breaker, self.limiter = slot, breaker, limiter
        self.retriever = retriever          # retrieval.Retriever (sqlite), OpenSearchRetriever, or None
        self.auth_enabled = auth_enabled
        self.grace_seconds = grace_seconds
        self.on_drain = on_drain            # async callback: health NOT_SERVING
        self.started = time.monotonic()

    def _degraded(self) -> admin_pb2.DegradedSwitch:
        return admin_pb2.DegradedSwitch(enabled=self.breaker.switch_on, reason=self.breaker.switch_reason)

    async def GetStatus(self, request, context) -> admin_pb2.GetStatusResponse:
        b = self.breaker
        resp = admin_pb2.GetStatusResponse(
            uptime_seconds=time.monotonic() - self.started, version=__version__,
            breaker=admin_pb2.BreakerStatus(state=BREAKER_STATES[b.state], consecutive_failures=b.failures,
                                            failure_threshold=b.config.failure_threshold,
                                            open_remaining_seconds=b.open_remaining, last_failure=b.last_failure),
            limits=limits_message(self.limiter.config), degraded=self._degraded(), draining=self.slot.draining,
            auth_enabled=self.auth_enabled)
        if self.retriever is not None:
            resp.knowledge.CopyFrom(await asyncio.to_thread(self._knowledge))
        e = self.slot.engine
        if e is None:                      # the first model is still loading
            return resp
        st, runner = e.stats(), e.runner
        hit_rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        resp.engine.CopyFrom(admin_pb2.EngineStatus(
            path=runner.path, attention=runner.attention_backend,
            cuda_graph_batch_sizes=runner.graph_batch_sizes, batch_size=st.batch_size,
            kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total, kv_block_size=runner.block_size,
            prefix_cache_hit_rate=hit_rate, preemptions=st.preemptions, max_len=e.max_len))
        resp.model, resp.model_path = self.slot.model_path.name, str(self.slot.model_path)
        resp.device, resp.dtype = str(e.device), str(e.dtype).removeprefix("torch.")
        resp.requests_in_flight, resp.requests_waiting = st.running, st.waiting
        resp.adapters.extend(adapter_message(a) for a in st.adapters)
        return resp

    async def SetDegraded(self, request, context) -> admin_pb2.SetDegradedResponse:
        if len(request.reason) > 500:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reason: at most 500 characters")
        self.breaker.set_switch(request.enabled, request.reason)
        return admin_pb2.SetDegradedResponse(degraded=self._degraded())

    async def UpdateLimits(self, request, context) -> admin_pb2.UpdateLimitsResponse:
        changes = {}
        for name in LimitsConfig.RATES:
            if not request.limits.HasField(name):
                continue
            msg, old = getattr(request.limits, name), getattr(self.limiter.config, name)
            changes[name] = Rate(rate=msg.rate if msg.HasField("rate") else old.rate,
                                 burst=msg.burst if msg.HasField("burst") else old.burst)
        try:
            cfg = self.limiter.update(**changes)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.warning("limits updated: %s", {k: (v.rate, v.burst) for k, v in changes.items()})
        return admin_pb2.UpdateLimitsResponse(limits=limits_message(cfg))

    async def ReloadModel(self, request, context) -> admin_pb2.ReloadModelResponse:
        try:
            previous, seconds = await self.slot.reload(request.model_path)
        except ReloadError as e:
            await context.abort(RELOAD_CODES[e.code], str(e))
        return admin_pb2.ReloadModelResponse(model_path=str(self.slot.model_path),
                                             previous_model_path=str(previous or ""), load_seconds=seconds)

    async def Drain(self, request, context) -> admin_pb2.DrainResponse:
        timeout = request.timeout_seconds or self.grace_seconds
        if not 0 <= timeout <= 86400:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be in [0, 86400]")
        if not self.slot.draining and self.on_drain is not None:
            await self.on_drain()
        left = await self.slot.drain(timeout)
        log.warning("drain: %s", "empty" if left == 0 else f"{left} requests still in flight after {timeout:g} s")
        return admin_pb2.DrainResponse(drained=left == 0, in_flight=left)

    # -- knowledge ---------------------------------------------------------------------------------
    def _knowledge(self) -> admin_pb2.KnowledgeStatus:
        if not hasattr(self.retriever, "knowledge_status"):
            return admin_pb2.KnowledgeStatus(backend="opensearch")
        version, articles, documents = self.retriever.knowledge_status()
        return admin_pb2.KnowledgeStatus(backend="sqlite", version=version, articles=articles, documents=documents)

    async def _index(self, context):
        if self.retriever is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "retrieval is off: start the server with retrieval.index (--retrieval-index FILE)")
        if not hasattr(self.retriever, "knowledge_status"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the OpenSearch backend: index documents into the cluster with its own tools")
        return self.retriever.path

    async def AddDocuments(self, request, context) -> admin_pb2.AddDocumentsResponse:
        index = await self._index(context)
        docs = [Document(d.id, d.law, d.article, d.text) for d in request.documents]
        try:
            change = await asyncio.to_thread(add_documents, index, docs,    # jieba, vectors, a write transaction
                                             getattr(self.retriever, "encoder", None))
        except InvalidDocuments as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.warning("knowledge: %d documents added, %d replaced -> version %d", change.added, change.replaced,
                    change.version)
        return admin_pb2.AddDocumentsResponse(added=change.added, replaced=change.replaced,
                                              knowledge=await asyncio.to_thread(self._knowledge))

    async def DeleteDocuments(self, request, context) -> admin_pb2.DeleteDocumentsResponse:
        index = await self._index(context)
        try:
            change = await asyncio.to_thread(delete_documents, index, list(request.ids))
        except InvalidDocuments as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.warning("knowledge: %d documents deleted, %d ids not found -> version %d", change.deleted,
                    len(change.not_found), change.version)
        return admin_pb2.DeleteDocumentsResponse(deleted=change.deleted, not_found=change.not_found,
                                                 knowledge=await asyncio.to_thread(self._knowledge))

    # -- adapters ----------------------------------------------------------------------------------
    async def _engine(self, context):
        engine = self.slot.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return engine

    async def _adapter_call(self, context, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except AdapterError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except EngineClosed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}; retry shortly")

    async def LoadAdapter(self, request, context) -> admin_pb2.LoadAdapterResponse:
        if name_problem(request.name):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, name_problem(request.name))
        if not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: an adapter directory on the server's disk")
        engine = await self._engine(context)
        t0 = time.perf_counter()
        info = await self._adapter_call(context, engine.load_adapter, request.name, request.path)
        seconds = time.perf_counter() - t0
        log.warning("adapter %r loaded from %s (rank %d, %s) in %.2f s", info["name"], info["path"], info["rank"],
                    ",".join(info["target_modules"]), seconds)
        return admin_pb2.LoadAdapterResponse(adapter=adapter_message(info), load_seconds=seconds)

    async def UnloadAdapter(self, request, context) -> admin_pb2.UnloadAdapterResponse:
        engine = await self._engine(context)
        if not await self._adapter_call(context, engine.unload_adapter, request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {request.name[:80]!r} is served")
        log.warning("adapter %r unloaded", request.name)
        return admin_pb2.UnloadAdapterResponse(name=request.name)

    async def ListAdapters(self, request, context) -> admin_pb2.ListAdaptersResponse:
        engine = await self._engine(context)
        infos = await self._adapter_call(context, engine.list_adapters)
        return admin_pb2.ListAdaptersResponse(adapters=[adapter_message(a) for a in infos])
