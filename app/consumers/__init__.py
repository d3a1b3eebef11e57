"""Our own consumer-group members, which attempt many deliveries at once and commit in order.

- `base.RecordConsumer`: what they share: take a record, decode and dispatch it as a task, park what
  cannot be decoded, commit only finished prefixes (app/offsets.py), wait for in-flight records on
  revocation, lag.
- `deliveries.DeliveryAgent`: `webhooks.deliveries` (async and smart), librdkafka (the hot path).
- `tiers.RetryTiers`: the retry tier topics, aiokafka (pause/seek/resume until a record is due).
"""
