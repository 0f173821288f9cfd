"""FastAPI dependencies: the settings, and the services the lifespan starts (store, worker
supervisor, metrics). Routers take these as `Depends(...)` arguments and never read
`request.app.state` themselves."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from service.metrics import Metrics
from service.settings import Settings
from service.store import JobStore
from service.supervisor import Supervisor


@dataclass
class Services:
    """What one running server holds; created and stopped by the app's lifespan."""

    store: JobStore
    supervisor: Supervisor
    metrics: Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_store(services: Services = Depends(get_services)) -> JobStore:
    return services.store


def get_supervisor(services: Services = Depends(get_services)) -> Supervisor:
    return services.supervisor


def get_metrics(services: Services = Depends(get_services)) -> Metrics:
    return services.metrics
