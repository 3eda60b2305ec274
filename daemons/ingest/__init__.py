"""iot-ingest: signed QoS 1 readings into SQLite or MySQL/MariaDB, with a DLQ on disk (seed 004).

signing.py  the payload wire formats (s1, ed1, rsa1, aes1): sign, encrypt, verify, validate
keys.py     the keys file, senders' key files, new keys
sinks.py    storage: one interface, SQLite and MySQL/MariaDB backends, versioned migrations
dlq.py      the dead-letter queue: append-only JSONL segments
worker.py   the daemon (iot-ingest)
cli.py      iotctl dlq ..., iotctl stress and iotctl keys new
(paho tuning for the hot path lives in daemons/mqtttune.py, used through mqttclient)
"""
