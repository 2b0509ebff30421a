"""GroqCloud-shaped API errors: one exception type, rendered as {"error": {message, type, param, code}}.

Shapes and codes follow GroqCloud (see the `groq` SDK 1.7.0 and GroqCloud's API reference,
summarised in /work/shared/reference/groqcloud-api.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

# HTTP status -> GroqCloud's error `type` for it.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",  # GroqCloud names the limited resource: "requests" or "tokens"
    500: "internal_server_error",
    503: "internal_server_error",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.type or ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status,
                            headers={**self.headers, **(extra_headers or {})})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def invalid_api_key() -> APIError:
    return APIError(401, "Invalid API Key", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    # GroqCloud's exact wording.
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def server_error(message: str) -> APIError:
    return APIError(500, message, code="internal_server_error")
