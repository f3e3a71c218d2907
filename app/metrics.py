"""Prometheus metrics, one registry per app so that several apps (tests) never collide."""
from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)


class Metrics:
    """The app's Prometheus registry and the HTTP request metrics."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "workspace_chat_http_requests_total", "HTTP requests answered.",
            ["method", "route", "status"], registry=self.registry)
        self.http_latency = Histogram(
            "workspace_chat_http_request_seconds", "Time to answer an HTTP request.",
            ["method", "route"], registry=self.registry)
        self.errors = Counter(
            "workspace_chat_errors_total", "Errors answered, by contract error code.",
            ["code", "transport"], registry=self.registry)
        self.connections = Gauge(
            "workspace_chat_socket_connections",
            "Socket.IO and /ws/chat connections open on this process.",
            registry=self.registry)
        self.connects = Counter(
            "workspace_chat_socket_connects_total",
            "Socket.IO and /ws/chat connections accepted.",
            registry=self.registry)
        self.messages = Counter(
            "workspace_chat_messages_total", "User messages stored and broadcast.",
            registry=self.registry)
        self.message_latency = Histogram(
            "workspace_chat_message_seconds",
            "Time from receiving a message event to its ack (checks, store, broadcast).",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
            registry=self.registry)
        self.agent_replies = Counter(
            "workspace_chat_agent_replies_total", "Agent replies, by kind and finish reason.",
            ["kind", "finish_reason"], registry=self.registry)
        self.agent_reply_seconds = Histogram(
            "workspace_chat_agent_reply_seconds", "Time an agent reply streamed.",
            ["kind"], buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        app.extensions["metrics"] = self
        app.before_request(self._start_timer)
        app.after_request(self._record)

    @staticmethod
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    def _record(self, response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        started = g.get("request_started")
        if started is not None:
            self.http_latency.labels(request.method, route).observe(time.perf_counter() - started)
        self.http_requests.labels(request.method, route, str(response.status_code)).inc()
        if response.status_code >= 400 and response.is_json:
            body = response.get_json(silent=True) or {}
            code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            if code:
                self.errors.labels(code, "http").inc()
        return response

    def render(self) -> Response:
        """The registry in Prometheus text format."""
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)
