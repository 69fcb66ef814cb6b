"""admin_service: lawchat.v1.AdminService — what the server runs and how busy it is."""
from __future__ import annotations

import time

from lawchat.v1 import admin_pb2, admin_pb2_grpc

from . import __version__


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.started = time.monotonic()

    async def GetStatus(self, request, context) -> admin_pb2.GetStatusResponse:
        e = self.engine
        st, runner = e.stats(), e.runner
        hit_rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        engine = admin_pb2.EngineStatus(
            path=runner.path, attention=runner.attention_backend,
            cuda_graph_batch_sizes=runner.graph_batch_sizes, batch_size=st.batch_size,
            kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total, kv_block_size=runner.block_size,
            prefix_cache_hit_rate=hit_rate, preemptions=st.preemptions, max_len=e.max_len)
        return admin_pb2.GetStatusResponse(
            model=self.model_name, device=str(e.device), dtype=str(e.dtype).removeprefix("torch."),
            uptime_seconds=time.monotonic() - self.started,
            requests_in_flight=st.running, requests_waiting=st.waiting, version=__version__, engine=engine)
