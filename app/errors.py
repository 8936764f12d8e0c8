"""Errors that carry their HTTP status, so the ingress maps them without a lookup table."""

from __future__ import annotations


class ServingError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"error": self.message, "type": self.error_type}


class InvalidInput(ServingError):
    status_code = 400
    error_type = "invalid_input"


class ModelNotFound(ServingError):
    status_code = 404
    error_type = "model_not_found"


class PayloadTooLarge(ServingError):
    status_code = 413
    error_type = "payload_too_large"


class RequestTimeout(ServingError):
    """The client did not send its request (its body) in time."""

    status_code = 408
    error_type = "request_timeout"


class RouteNotFound(ServingError):
    status_code = 404
    error_type = "not_found"


class MethodNotAllowed(ServingError):
    status_code = 405
    error_type = "method_not_allowed"


class Overloaded(ServingError):
    status_code = 503
    error_type = "overloaded"


class ReplicaUnavailable(ServingError):
    """The replica lost a device or rank and is being replaced; a retry goes to a healthy one."""

    status_code = 503
    error_type = "replica_unavailable"


class ModelFailure(ServingError):
    status_code = 500
    error_type = "model_failure"


class GenerationTimeout(ServingError):
    """A generation ran past its model's generation.request_timeout_s."""

    status_code = 504
    error_type = "timeout"
