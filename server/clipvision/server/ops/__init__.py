"""Operations: metrics and their endpoint, logs, per-call records, health and the device
watchdog. Any layer may report here; nothing here calls a layer."""
