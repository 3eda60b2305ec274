"""The MQTT 3.1.1 broker: a pure codec and topic tree, wrapped by an asyncio server."""
