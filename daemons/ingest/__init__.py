"""iot-ingest: signed QoS 1 readings into SQLite or MySQL/MariaDB, with a DLQ on disk (seed 004).

signing.py  the signed-payload wire format, keys file, sign/verify/validate
sinks.py    storage: one interface, SQLite and MySQL/MariaDB backends, versioned migrations
dlq.py      the dead-letter queue: append-only JSONL segments
worker.py   the daemon (iot-ingest)
cli.py      iotctl dlq ... and iotctl stress
(paho tuning for the hot path lives in daemons/mqtttune.py, used through mqttclient)
"""
