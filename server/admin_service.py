"""admin_service: lawchat.v1.AdminService — what the server runs and how busy it is."""
from __future__ import annotations

import time

from lawchat.v1 import admin_pb2, admin_pb2_grpc

from . import __version__


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, engine, runner, model_name: str):
        self.engine = engine
        self.runner = runner
        self.model_name = model_name
        self.started = time.monotonic()

    async def GetStatus(self, request, context) -> admin_pb2.GetStatusResponse:
        return admin_pb2.GetStatusResponse(
            model=self.model_name, device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            uptime_seconds=time.monotonic() - self.started,
            requests_in_flight=self.engine.running, requests_waiting=self.engine.waiting, version=__version__)
