"""iot-plc (PLC readings to MQTT at QoS 1, stored and forwarded) and iot-dbsub (readings into SQLite)."""
