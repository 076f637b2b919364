"""Operations: metrics and their endpoint, logs, per-call records, health, the device watchdog
and the healthcheck command. Any layer may report here; nothing here calls a layer."""
