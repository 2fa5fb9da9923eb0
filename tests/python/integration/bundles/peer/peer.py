"""A test bundle for discovery and agent-to-agent calls: `echo` answers, `find` and `ask` use the endpoint."""

from typing import Any

from pyagent.protocol import RemoteError
from pyagent.runtime import Agent, method


class Peer(Agent):
    """Answers other agents and asks them."""

    capabilities = ("Lookup",)

    @method
    def echo(self, text: str) -> str:
        """Return `text` with this object's name."""
        return f"{self.name}: {text}"

    @method
    async def find(self, capability: str, how_many: int = 1, all: bool = False) -> list[dict[str, Any]]:
        """`self.discover(...)`, as the endpoint answers it."""
        return await self.discover(capability=capability, how_many=how_many, all=all)

    @method
    async def ask(self, target: str, text: str) -> dict[str, Any]:
        """`self.call(target, "peer.echo", text=text)`: {"result": ...} or {"error": {code, message}}."""
        try:
            return {"result": await self.call(target, "peer.echo", text=text, timeout=5.0)}
        except RemoteError as exc:
            return {"error": exc.to_error()}
