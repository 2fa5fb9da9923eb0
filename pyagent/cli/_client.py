"""Finding the endpoint's operator API and talking to it (stdlib `urllib`, proxies ignored: the API is local)."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent.cli._errors import ApiError, UnreachableError, UsageError

DEFAULT_HTTP_TIMEOUT = 10.0


def default_state_dir() -> Path:
    """`$PYAGENT_STATE_DIR`, else `~/.local/state/pyagent/endpoint`."""
    env = os.environ.get("PYAGENT_STATE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "state" / "pyagent" / "endpoint"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ApiTarget:
    url: str
    token: str
    hint: str = ""  # added to "cannot reach" messages (e.g. the endpoint's process is gone)


def find_api(state_dir: Path | None = None, api: str | None = None) -> ApiTarget:
    """The API URL: `--api`, `$PYAGENT_API`, else STATE_DIR/endpoint.json; the token: `$PYAGENT_TOKEN`, else
    STATE_DIR/operator-token."""
    root = (state_dir or default_state_dir()).expanduser()
    url = api or os.environ.get("PYAGENT_API") or None
    hint = ""
    if url is None:
        info_path = root / "endpoint.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnreachableError(f"no endpoint found: {info_path} does not exist (start one with "
                                   "`pyagent endpoint serve`, or pass --state-dir DIR or --api URL)") from None
        except (OSError, ValueError) as exc:
            raise UnreachableError(f"cannot read {info_path}: {exc}") from None
        url = info.get("api") if isinstance(info, dict) else None
        if not isinstance(url, str) or not url:
            raise UnreachableError(f"the endpoint in {root} runs without the operator API")
        if not _pid_alive(info.get("pid")):
            hint = f" (the endpoint that wrote {info_path}, pid {info.get('pid')}, is not running)"
    token = os.environ.get("PYAGENT_TOKEN")
    if not token:
        token_path = root / "operator-token"
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"no operator token: cannot read {token_path} ({exc.strerror or exc}); "
                             "set PYAGENT_TOKEN or pass --state-dir DIR") from None
        if not token:
            raise UsageError(f"no operator token: {token_path} is empty")
    return ApiTarget(url.rstrip("/"), token, hint)


class ApiClient:
    def __init__(self, target: ApiTarget) -> None:
        self.target = target
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, timeout: float = DEFAULT_HTTP_TIMEOUT) -> Any:
        return self._request("GET", path, None, timeout)

    def post(self, path: str, body: Any, timeout: float = DEFAULT_HTTP_TIMEOUT) -> Any:
        return self._request("POST", path, json.dumps(body).encode("utf-8"), timeout)

    def delete(self, path: str, timeout: float = DEFAULT_HTTP_TIMEOUT) -> Any:
        return self._request("DELETE", path, None, timeout)

    def agents(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.get("/api/v1/agents")["agents"]
        return agents

    def agent(self, ref: str) -> dict[str, Any]:
        record: dict[str, Any] = self.get("/api/v1/agents/" + urllib.parse.quote(ref, safe=""))
        return record

    def call(self, target: str, method: str, params: dict[str, Any], timeout: float,
             concurrency: int | None = None) -> dict[str, Any]:
        """`{"result": ...}` or `{"error": {...}}` (or per-target `{"results": {...}}` when the target selects
        agents); the HTTP request waits a little longer than the call."""
        body: dict[str, Any] = {"target": target, "method": method, "params": params, "timeout": timeout}
        if concurrency is not None:
            body["concurrency"] = concurrency
        reply: dict[str, Any] = self.post("/api/v1/call", body, timeout=timeout + 5)
        return reply

    def _request(self, method: str, path: str, data: bytes | None, timeout: float) -> Any:
        url = self.target.url + path
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.target.token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        })
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise _api_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
            raise UnreachableError(f"cannot reach the endpoint API at {self.target.url}: {reason}"
                                   f"{self.target.hint}") from None
        except (TimeoutError, socket.timeout):
            raise UnreachableError(f"the endpoint API at {self.target.url} did not answer within {timeout:g} s")
        except (ConnectionError, OSError) as exc:
            raise UnreachableError(f"cannot reach the endpoint API at {self.target.url}: {exc}"
                                   f"{self.target.hint}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ApiError(200, None, f"the endpoint API at {self.target.url} answered something that is not "
                                      "JSON") from None


def _api_error(status: int, body: bytes) -> ApiError:
    code: int | None = None
    message = f"HTTP {status}"
    try:
        error = json.loads(body)["error"]
        code = error.get("code")
        message = f"{error['message']} (HTTP {status})"
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if status == 401:
        message += "; check PYAGENT_TOKEN or the operator-token file in the state directory"
    elif status == 403:
        message += "; use an operator token with that scope (`pyagent operator-token create --scope ...`)"
    return ApiError(status, code if isinstance(code, int) else None, message)
