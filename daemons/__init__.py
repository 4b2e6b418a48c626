"""One package per lifecycle step; each is an independent asyncio daemon."""
