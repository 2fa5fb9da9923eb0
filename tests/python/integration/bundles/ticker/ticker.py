"""A test bundle that emits events: `tick` every `interval` seconds, and `burst` on demand."""

from pyagent.runtime import Agent, method, periodic, setting


class Ticker(Agent):
    """Emits numbered events."""

    capabilities = ("Ticking",)

    interval: float = setting(0.2, ge=0.05, le=60.0, help="seconds between two ticks")
    label: str = setting("t", min_length=1, max_length=8, help="put in every event")

    async def init(self) -> None:
        self.ticks = 0

    @periodic(lambda self: self.interval)
    def tick(self) -> None:
        """Emit `tick` {n, label}."""
        self.ticks += 1
        self.emit("tick", {"n": self.ticks, "label": self.label})

    @method
    def burst(self, count: int, tag: str = "b") -> int:
        """Emit `count` `burst` events {i, tag}; return count."""
        for i in range(count):
            self.emit("burst", {"i": i, "tag": tag})
        return count

    @method
    def ping(self) -> str:
        """Answer pong."""
        return "pong"
